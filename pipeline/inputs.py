"""Reading labelled inputs outside Beam, for `train`, `calibrate` and `evaluate`: the same inputs `label` reads.

TFRecord shards (plain or GZIP, local or any Beam filesystem) of tf.train.Example in the TF Object Detection API
convention, or image files by glob with the label taken from a manifest (`--labels`), from the object names of
their ground truth (`--ground_truth`, pipeline/ground_truth.py) or from the parent folder. Records stream one at a time so a
training set need not fit in memory. Damaged records and undecodable images are skipped with a warning (`label`
is the command that accounts for every input).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import zlib
from typing import Iterator, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems

from weakloc.models import defaults, images, records
from weakloc.models.files import open_maybe_gzip
from weakloc.models.annotate import resolve_labels
from weakloc.models.reading import InputReader, RawInput

from .options import OptionsError, input_layout

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Example:
    """One labelled picture. pixels: uint8 (H_in, W_in, 3) or None when not decoded; label_ids: model class ids
    (-1 unknown); gt_boxes: float32 (n, 4) normalised x0y0x1y1 with gt_ids per box; width/height: original size
    (None when not decoded)."""

    image_id: str
    label_ids: list[int]
    gt_boxes: np.ndarray
    gt_ids: list[int]
    pixels: Optional[np.ndarray] = None
    width: Optional[int] = None
    height: Optional[int] = None
    gt_texts: list[str] = dataclasses.field(default_factory=list)
    source: str = ""


@dataclasses.dataclass
class Source:
    """The files behind --input patterns, their format and the class names found in them."""

    files: list[str]
    input_format: str
    folder_labels: bool
    class_names: tuple[str, ...]
    count: int
    fingerprint: str  # sha256 (16 hex) of the sorted (id, labels) pairs: which data a model saw
    manifest: Optional[dict] = None  # pipeline/ground_truth.load_manifest: path -> labels
    ground_truth: Optional[object] = None  # a ground_truth.GroundTruth: boxes, and labels from their names
    folder_names: tuple[str, ...] = ()  # the parent folders that gave labels (to warn when none is a class)


def _image_labels(source: "Source", path: str, folder_label: Optional[str]) -> list[str]:
    """An image file's labels: its manifest line, else its true boxes' names, else its folder (when on)."""
    from .ground_truth import manifest_labels

    if source.manifest is not None:
        found = manifest_labels(source.manifest, path)
        if found is not None:
            return found
    if source.ground_truth is not None:
        found = source.ground_truth.find(path, path)
        if found is not None:
            return sorted({n for n, _ in found[0]})
    return [folder_label] if folder_label else []


def _boxes_beside_hint(fmt: str, files: Sequence[str], ground_truth) -> str:
    """'; VOC XML lie beside them (...): pass --ground_truth DIR ...' when a labelless folder has boxes to hand."""
    if fmt != "images" or ground_truth is not None:
        return ""
    from .ground_truth import beside_images  # ground_truth imports this module

    found = beside_images(files)
    if found is None:
        return ""
    return (f"; VOC XML lie beside these pictures ({found.origin[0]}): pass --ground_truth {found.origin[0]} to "
            "take each picture's labels from its objects")


def match_patterns(patterns: Sequence[str]) -> list[str]:
    files = []
    for pattern in patterns:
        found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        if not found:
            raise OptionsError(f"--input {pattern!r} matches no file")
        files.extend(found)
    return list(dict.fromkeys(files))


def _raw_records(files: Sequence[str], input_format: str, folder_labels: bool, *,
                 read_images: bool = True) -> Iterator[RawInput]:
    """Every record or image file as `label` reads it; damaged shard tails are skipped with a warning.
    `read_images=False` gives image files an empty payload (their labels need no bytes)."""
    for path in files:
        if input_format == "images":
            folder = posixpath.basename(posixpath.dirname(path)) if folder_labels else None
            if not read_images:
                yield RawInput(path, "image", b"", image_id=path, folder_label=folder)
                continue
            with FileSystems.open(path) as f:
                yield RawInput(path, "image", f.read(), image_id=path, folder_label=folder)
            continue
        with open_maybe_gzip(path) as stream:
            try:
                for i, (_, data) in enumerate(records.iter_records(stream)):
                    yield RawInput(f"{path}:{i}", "example", data)
            except (records.RecordError, EOFError, OSError) as exc:
                logger.warning("skipping the rest of %s: %s", path, exc)


def scan(
    patterns: Sequence[str],
    *,
    input_format: Optional[str] = None,
    labels_from_folder: str = "auto",
    class_names: Optional[Sequence[str]] = None,
    label_offset: int = 0,
    manifest: Optional[dict] = None,
    ground_truth=None,
) -> Source:
    """Match the patterns and read every label once (no pixel is decoded) to name the classes.

    Class names, unless given: the sorted label names (manifest, true boxes' names or folders for images,
    `image/class/text` for TFRecord); with integer labels only, `class_0`... up to the largest label.
    `manifest` and `ground_truth` (pipeline/ground_truth.py) name image files' labels before their folder does.
    """
    files = match_patterns(patterns)
    fmt, folder = input_layout(patterns, input_format, labels_from_folder)
    if manifest is not None or ground_truth is not None:
        folder = folder and labels_from_folder == "yes"  # explicit labels win over a guessed layout
    probe = Source(files, fmt, folder, (), 0, "", manifest, ground_truth)
    texts, ints, keys, folders = set(), set(), [], set()
    for raw in _raw_records(files, fmt, folder, read_images=False):
        if raw.kind == "image":
            lab = _image_labels(probe, raw.source, raw.folder_label)
            if raw.folder_label and lab == [raw.folder_label]:
                folders.add(raw.folder_label)
            texts.update(lab)
            keys.append(f"{raw.source}\t{','.join(lab)}")
            continue
        try:
            ex = records.parse_example(raw.payload)
        except records.ExampleError as exc:
            logger.warning("skipping %s: %s", raw.source, exc)
            continue
        texts.update(ex.label_texts)
        ints.update(v - label_offset for v in ex.labels)
        keys.append(f"{ex.image_id or raw.source}\t{ex.labels}\t{ex.label_texts}")
    if class_names:
        names = tuple(class_names)
    elif texts:
        names = tuple(sorted(texts))
    elif ints:
        if min(ints) < 0:
            raise OptionsError(f"integer labels go below 0 after --label_offset {label_offset}: {min(ints)}")
        names = tuple(f"class_{i}" for i in range(max(ints) + 1))
    else:
        raise OptionsError(
            f"no image-level labels in {len(files)} input files (TFRecord: image/class/text or image/class/label; "
            "images: a class-per-folder layout such as root/*/*.jpg, a manifest --labels labels.csv, or the "
            f"objects of true boxes --ground_truth VOC_DIR|COCO.json){_boxes_beside_hint(fmt, files, ground_truth)}"
        )
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return Source(files, fmt, folder, names, len(keys), digest, manifest, ground_truth, tuple(sorted(folders)))


def iterate(
    source: Source,
    *,
    input_size: Optional[tuple[int, int]] = None,
    label_offset: int = 0,
    max_pixels: int = defaults.MAX_PIXELS,
    keep_texts: bool = False,
) -> Iterator[Example]:
    """Every readable input as an Example, read as `label` reads it (models/reading.py); decoded to `input_size`
    when given (undecodable ones are skipped with a warning).

    Image files take their labels from `source.manifest` or `source.ground_truth` first; decoded pictures take
    their true boxes from `source.ground_truth` (normalised by the picture's size). `keep_texts` keeps the boxes'
    class names in `gt_texts` (for classes the model may not know)."""
    reader = InputReader(source.class_names, input_size=input_size or (1, 1), label_offset=label_offset,
                         max_pixels=max_pixels)
    for raw in _raw_records(source.files, source.input_format, source.folder_labels):
        try:
            parsed = reader.parse(raw)
        except records.ExampleError:
            continue  # already reported by scan()
        if raw.kind == "image" and (source.manifest is not None or source.ground_truth is not None):
            ids, texts = resolve_labels([], _image_labels(source, raw.source, raw.folder_label), source.class_names)
            parsed = dataclasses.replace(parsed, label_ids=ids, label_texts=texts)
        texts_kept = list(parsed.gt_texts) if keep_texts else []
        if input_size is None:
            yield Example(image_id=parsed.image_id, label_ids=parsed.label_ids,
                          gt_boxes=np.asarray(parsed.gt_boxes, np.float32).reshape(-1, 4), gt_ids=parsed.gt_ids,
                          gt_texts=texts_kept, source=raw.source)
            continue
        try:
            meta, pixels = reader.decode(parsed)
        except images.ImageDecodeError as exc:
            logger.warning("skipping %s: %s", raw.source, exc)
            continue
        item = Example(image_id=meta.image_id, label_ids=meta.label_ids,
                       gt_boxes=np.asarray(meta.gt_boxes, np.float32).reshape(-1, 4), gt_ids=meta.gt_ids,
                       pixels=pixels, width=meta.width, height=meta.height, gt_texts=texts_kept, source=raw.source)
        if source.ground_truth is not None:
            _attach_ground_truth(item, source)
        yield item


def _attach_ground_truth(item: Example, source: Source) -> None:
    """Replace a decoded example's true boxes with those --ground_truth gives for it (kept when it has none)."""
    objs = source.ground_truth.pixel_boxes(item.image_id, item.source, item.width, item.height)
    if objs is None:
        return
    size = np.array([item.width, item.height, item.width, item.height], np.float32)
    item.gt_boxes = (np.asarray([b for _, b in objs], np.float32).reshape(-1, 4) / size).clip(0.0, 1.0)
    item.gt_ids, item.gt_texts = resolve_labels([], [n for n, _ in objs], source.class_names)


def in_validation(image_id: str, percent: float) -> bool:
    """A stable split by content of the id (CRC32), so a streamed dataset splits the same way every epoch."""
    return (zlib.crc32(image_id.encode("utf-8")) % 10000) < percent * 100


def warn_folder_labels(source: Source, class_names: Optional[Sequence[str]] = None) -> Optional[str]:
    """Warn at launch when folder labels look wrong (models/groundtruth.folder_label_problem); returns the text."""
    from weakloc.models.groundtruth import folder_label_problem

    problem = folder_label_problem(source.folder_names, class_names) if source.folder_labels else None
    if problem:
        logger.warning("%s", problem)
    return problem
