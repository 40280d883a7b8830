"""True boxes and image-level labels from where users keep them, for `calibrate`, `evaluate`, `report`, `datasets`
and `train`: one reader for every command.

    --ground_truth VOC_DIR | COCO.json | 'shards/*.tfrecord'   (repeatable)
    --labels manifest.csv | manifest.jsonl                      (path,label[,label...])

Pictures meet their truth by image id, then by file name, then by file stem; a folder of JPEGs with VOC XML beside
them (same stem) needs no flag at all. Boxes come back in pixels of the picture as decoded, after its EXIF
orientation (x0y0x1y1, max edge exclusive), whatever the source: VOC boxes of a rotated picture turn with it
(models/groundtruth.voc_boxes_as_seen), TFRecord boxes, stored normalised, are scaled by the picture's size.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from typing import Iterable, NamedTuple, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from weakloc.models import groundtruth as gtf
from weakloc.models.groundtruth import Objects

from .options import OptionsError

logger = logging.getLogger(__name__)

# Where datasets keep VOC XML next to an images/ folder (kangaroo: annots/, raccoon: annotations/).
_XML_FOLDERS = ("annots", "annotations", "Annotations", "xml")


class Entry(NamedTuple):
    """One picture's true boxes as its source gives them."""

    objects: Objects
    normalised: bool  # fractions of the picture (TFRecords), else pixels
    voc_size: Optional[tuple[int, int]] = None  # a VOC file's declared (width, height) ((0, 0): none); see pixel_boxes


@dataclasses.dataclass
class GroundTruth:
    """True boxes per picture, by key (id, file name, stem)."""

    entries: dict[str, Entry]
    origin: list[str]

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, image_id: str, source: Optional[str] = None) -> Optional[Entry]:
        for key in _keys(image_id, source):
            if key in self.entries:
                return self.entries[key]
        return None

    def pixel_boxes(self, image_id: str, source: Optional[str], width: int, height: int,
                    orientation: Optional[int] = None) -> Optional[Objects]:
        """The picture's true boxes in pixels of the picture as decoded (`width` x `height`, after its EXIF
        orientation), or None when the ground truth does not know it.

        VOC boxes of a rotated picture are turned with it (groundtruth.voc_boxes_as_seen); the picture's
        `orientation` is read from `source` when not given (an unreadable file: taken as not rotated)."""
        found = self.find(image_id, source)
        if found is None:
            return None
        objs, normalised, voc_size = found
        if normalised:
            return [(n, [b[0] * width, b[1] * height, b[2] * width, b[3] * height]) for n, b in objs]
        objs = [(n, list(b)) for n, b in objs]
        if voc_size is None:
            return objs
        if orientation is None:
            orientation = _orientation_of(source or image_id)
        return gtf.voc_boxes_as_seen(objs, voc_size, (width, height), orientation)

    def class_names(self) -> list[str]:
        return sorted({n for e in self.entries.values() for n, _ in e.objects})


def _orientation_of(path: str) -> int:
    from weakloc.models.images import file_orientation

    try:
        with FileSystems.open(path) as f:
            return file_orientation(f)
    except Exception:  # no such file (an id, not a path) or not a picture: nothing to rotate by
        return 1


def _keys(image_id: str, source: Optional[str]) -> list[str]:
    """Lookup order: the exact id, the source path, then each one's file name and stem."""
    keys = [image_id]
    for p in (source, image_id):
        if p:
            keys += [p, posixpath.basename(p), gtf.stem(p)]
    return list(dict.fromkeys(k for k in keys if k))


def _read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def _voc_entries(xml_paths: Iterable[str]) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for path in xml_paths:
        try:
            name, w, h, objs = gtf.voc_boxes(_read_text(path))
        except (gtf.GroundTruthError, UnicodeDecodeError) as exc:
            raise OptionsError(f"--ground_truth: {path}: {exc}") from None
        # Some VOC files name another extension or nothing useful: the XML's own stem is a key too.
        for key in (name, gtf.stem(name) if name else "", gtf.stem(path)):
            if key:
                out.setdefault(key, Entry(objs, False, (w, h)))
    return out


def load_voc(folder: str) -> dict[str, Entry]:
    """Every *.xml under `folder`, recursively, keyed by the file name it names, its stem and the XML's stem."""
    xmls = [os.path.join(d, fn) for d, _, files in os.walk(folder) for fn in sorted(files) if fn.endswith(".xml")]
    if not xmls:
        raise OptionsError(f"--ground_truth {folder} is a folder without any Pascal VOC .xml file")
    return _voc_entries(xmls)


def load_coco(path: str) -> dict[str, Entry]:
    try:
        index = gtf.coco_index(json.loads(_read_text(path)))
    except json.JSONDecodeError as exc:
        raise OptionsError(f"--ground_truth {path} is not valid JSON: {exc}") from None
    except gtf.GroundTruthError as exc:
        raise OptionsError(f"--ground_truth {path}: {exc}") from None
    return {k: Entry(v, False) for k, v in index.items()}


def load_tfrecords(pattern: str, class_names: Sequence[str] = ()) -> dict[str, Entry]:
    """Boxes the shards' examples carry (image/object/bbox/*, normalised), keyed by image id; integer box labels
    are named by `class_names`."""
    from . import inputs

    source = inputs.scan([pattern], input_format="tfrecord", class_names=tuple(class_names) or ("",))
    out: dict[str, Entry] = {}
    for ex in inputs.iterate(source, keep_texts=True):
        objs = [(t, list(b)) for t, b in zip(ex.gt_texts, ex.gt_boxes.tolist())]
        out[ex.image_id] = Entry(objs, True)
    return out


def load(specs: Sequence[str], class_names: Sequence[str] = ()) -> GroundTruth:
    """One GroundTruth from `--ground_truth` values: VOC folders, COCO .json files and TFRecord patterns
    (whose integer labels `class_names` names)."""
    entries: dict[str, Entry] = {}
    for spec in specs:
        if spec.endswith(".json"):
            if not FileSystems.exists(spec):
                raise OptionsError(f"--ground_truth {spec} does not exist")
            found = load_coco(spec)
        elif os.path.isdir(spec):
            found = load_voc(spec)
        elif spec.endswith(".xml"):
            matched = sorted(m.path for m in FileSystems.match([spec])[0].metadata_list)
            if not matched:
                raise OptionsError(f"--ground_truth {spec!r} matches no file")
            found = _voc_entries(matched)
        else:
            if not FileSystems.match([spec])[0].metadata_list:
                raise OptionsError(f"--ground_truth {spec!r} is no folder, no .json and matches no file (expected "
                                   "a Pascal VOC folder, a COCO .json or a TFRecord pattern)")
            found = load_tfrecords(spec, class_names)
        for k, v in found.items():
            entries.setdefault(k, v)
    return GroundTruth(entries, list(specs))


def beside_images(files: Sequence[str]) -> Optional[GroundTruth]:
    """VOC XML files that lie beside the pictures (same stem), or in an annots/ or annotations/ folder next to
    theirs; None when not one picture has one."""
    xmls = []
    for path in files:
        folder, name = posixpath.split(path)
        xml = gtf.stem(name) + ".xml"
        candidates = [posixpath.join(folder, xml)] + [posixpath.join(posixpath.dirname(folder), sub, xml)
                                                      for sub in _XML_FOLDERS]
        found = next((c for c in candidates if FileSystems.exists(c)), None)
        if found:
            xmls.append(found)
    if not xmls:
        return None
    return GroundTruth(_voc_entries(xmls), sorted({posixpath.dirname(x) for x in xmls}))


def load_manifest(path: str) -> dict[str, list[str]]:
    """{key: labels} of a CSV or JSONL manifest, keyed by the path as written, made absolute against the
    manifest's folder, and by file name, so pictures meet their line by any of them."""
    if not FileSystems.exists(path):
        raise OptionsError(f"--labels {path} does not exist")
    try:
        parsed = gtf.parse_manifest(_read_text(path), jsonl=path.endswith((".jsonl", ".ndjson")))
    except (gtf.GroundTruthError, UnicodeDecodeError) as exc:
        raise OptionsError(f"--labels {path}: {exc}") from None
    if not parsed:
        raise OptionsError(f"--labels {path} lists no picture")
    base = posixpath.dirname(path)
    out: dict[str, list[str]] = {}
    for p, labels in parsed.items():
        full = p if posixpath.isabs(p) or "://" in p else posixpath.normpath(posixpath.join(base, p))
        for key in (p, full, os.path.abspath(full) if "://" not in full else full, posixpath.basename(p)):
            out.setdefault(key, labels)
    return out


def manifest_labels(manifest: dict[str, list[str]], path: str) -> Optional[list[str]]:
    for key in (path, os.path.abspath(path) if "://" not in path else path, posixpath.basename(path)):
        if key in manifest:
            return manifest[key]
    return None


def attach_to_rows(rows: list[dict], truth: GroundTruth, class_names: Sequence[str]) -> int:
    """Replace each annotation row's gt_boxes with its true boxes in `truth` (original pixels); returns how many
    rows found theirs. Rows it does not know keep what they had."""
    index = {n: i for i, n in enumerate(class_names)}
    matched = 0
    for row in rows:
        objs = truth.pixel_boxes(row["image_id"], row.get("source"), row["width"], row["height"])
        if objs is None:
            continue
        matched += 1
        row["gt_boxes"] = [dict(class_id=index.get(name, -1), label=name, xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])
                           for name, b in objs]
    return matched
