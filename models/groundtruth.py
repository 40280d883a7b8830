"""Ground truth and labels in the formats users keep them: Pascal VOC XML, COCO detection JSON, label manifests.

Pure parsing: text (or a parsed JSON document) in, plain Python out; reading files is pipeline/ground_truth.py's.
Boxes are x0y0x1y1 continuous pixels of the picture the file was drawn on, max edge exclusive (voc_boxes_as_seen
turns VOC boxes into the EXIF-rotated frame weakloc decodes to): VOC's 1-based inclusive corners
become (xmin - 1, ymin - 1, xmax, ymax), COCO's (x, y, w, h) becomes (x, y, x + w, y + h).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import xml.etree.ElementTree as ET

# (class name, [x0, y0, x1, y1]) per true box of one picture.
Objects = list[tuple[str, list[float]]]

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def voc_boxes_as_seen(objs: Objects, declared: tuple[int, int], seen: tuple[int, int], orientation: int) -> Objects:
    """VOC boxes in the frame weakloc decodes a picture to: after its EXIF orientation (ImageOps.exif_transpose).

    A VOC file says which frame it was drawn on only through its <size>. When that is the size as seen (after
    the rotation) and not the stored one, the boxes are already as seen. Otherwise (the stored size, 0x0, or a
    rotation that keeps the size, 2-4, or a square picture) they are taken as drawn on the stored pixels, as
    labelImg, the usual VOC writer, draws them (it reads pixels without applying EXIF and writes their size),
    and are rotated with the picture.

    Args:
      objs: the file's objects, boxes x0y0x1y1 in pixels (voc_boxes).
      declared: (width, height) of the file's <size>; (0, 0) when unknown.
      seen: (width, height) of the decoded picture, after EXIF orientation.
      orientation: the picture's EXIF orientation tag, 1-8 (anything else: 1, nothing to do).
    """
    from .boxes import orient_normalized_boxes  # boxes.py pulls in OpenCV: only when a picture is rotated

    if orientation not in range(2, 9) or not objs:
        return objs
    sw, sh = seen
    stored = (sh, sw) if orientation in _TRANSPOSED else (sw, sh)
    if tuple(declared) == (sw, sh) and (sw, sh) != stored:
        return objs
    norm = [[b[0] / stored[0], b[1] / stored[1], b[2] / stored[0], b[3] / stored[1]] for _, b in objs]
    turned = orient_normalized_boxes(norm, orientation).tolist()
    return [(n, [b[0] * sw, b[1] * sh, b[2] * sw, b[3] * sh]) for (n, _), b in zip(objs, turned)]


class GroundTruthError(ValueError):
    """A ground-truth or manifest document that cannot be read; the message names the file and the problem."""


def stem(path: str) -> str:
    """The file name without folders or extension: how ground truth and pictures meet when ids differ."""
    return posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]


def voc_boxes(xml_text: str) -> tuple[str, int, int, Objects]:
    """(file name, width, height, objects) of one Pascal VOC XML document.

    Raises:
      GroundTruthError: not XML, or an object whose bndbox lacks a numeric corner.
    """
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise GroundTruthError(f"not a VOC XML document ({exc})") from None
    name = (root.findtext("filename") or "").strip()
    try:
        w = int(float(root.findtext("size/width") or 0))
        h = int(float(root.findtext("size/height") or 0))
    except ValueError:
        w = h = 0  # some files say nothing usable: the picture itself has the size
    objs = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise GroundTruthError(f"an object of {name or 'this file'} has a bndbox without numeric "
                                   "xmin/ymin/xmax/ymax") from None
        objs.append(((obj.findtext("name") or "").strip(), [x0 - 1, y0 - 1, x1, y1]))
    return name, w, h, objs


def coco_index(doc) -> dict[str, Objects]:
    """{file_name, and its stem: objects} of a COCO detection document (bbox x, y, w, h).

    Keyed by the full `file_name` (which `weakloc export` sets to the image id when it copies no picture) and by
    its stem (how a dataset's own COCO file names the pictures weakloc read from disk); an exact name wins over a
    stem that happens to equal it.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise GroundTruthError("not a COCO detection document (expected an object with an \"images\" list)")
    cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
    boxes: dict = {im["id"]: [] for im in doc["images"]}
    for a in doc.get("annotations", []):
        if a.get("image_id") not in boxes or len(a.get("bbox") or ()) != 4:
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes[a["image_id"]].append((cats.get(a["category_id"], str(a["category_id"])), [x, y, x + w, y + h]))
    out: dict[str, Objects] = {}
    for im in doc["images"]:
        out.setdefault(stem(im["file_name"]), boxes[im["id"]])
    for im in doc["images"]:
        out[im["file_name"]] = boxes[im["id"]]
    return out


def parse_manifest(text: str, *, jsonl: bool) -> dict[str, list[str]]:
    """{path as written: image-level labels} of a manifest.

    CSV: one `path,label[,label...]` per line (an optional first line `path,label...` is a header; blank labels
    are dropped). JSONL: one object per line with "path" and "labels" (a list) or "label" (a name).

    Raises:
      GroundTruthError: a line without a path, or a JSONL line that is not such an object.
    """
    out: dict[str, list[str]] = {}
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GroundTruthError(f"line {n} is not JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
                raise GroundTruthError(f'line {n}: expected {{"path": ..., "labels": [...]}}, got {line[:80]!r}')
            labels = rec.get("labels", [rec["label"]] if "label" in rec else [])
            if isinstance(labels, str):
                labels = [labels]
            out[rec["path"]] = [str(v).strip() for v in labels if str(v).strip()]
        return out
    for n, fields in enumerate(csv.reader(io.StringIO(text)), 1):
        if not fields or not any(f.strip() for f in fields):
            continue
        if n == 1 and fields[0].strip().lower() in ("path", "file", "filename", "image"):
            continue
        path = fields[0].strip()
        if not path:
            raise GroundTruthError(f"line {n} has no path in its first field")
        out[path] = [f.strip() for f in fields[1:] if f.strip()]
    return out


# Folder names that hold pictures in common dataset layouts, never a class (kangaroo/images/*.jpg, VOC's JPEGImages).
LAYOUT_FOLDERS = frozenset({"images", "image", "imgs", "img", "jpegimages", "pictures", "photos", "data", "train",
                            "test", "val", "valid", "validation"})


def folder_label_problem(folder_names, class_names=None):
    """Why labels taken from parent folders are likely wrong, or None.

    With the model's `class_names`: when no folder names a class (every image would get an unknown label, so
    `--classes labels` boxes nothing). Without (training, where folders become the classes): when a folder has a
    layout name such as `images` or `train`.
    """
    folders = sorted(set(folder_names))
    if not folders:
        return None
    shown = ", ".join(folders[:6]) + (" ..." if len(folders) > 6 else "")
    if class_names is not None:
        if not set(folders) & set(class_names):
            return (f"labels are taken from the parent folders ({shown}) but none of them is a model class "
                    f"(e.g. {', '.join(list(class_names)[:4])}): every image gets an unknown label. Use a "
                    "class-per-folder layout, --labels MANIFEST, or --labels_from_folder no")
        return None
    layout = [f for f in folders if f.lower() in LAYOUT_FOLDERS]
    if layout:
        return (f"labels are taken from the parent folders and {', '.join(layout)} looks like a layout folder, not a "
                "class: use a class-per-folder layout (root/CLASS/*.jpg), --labels MANIFEST, --ground_truth "
                "VOC_DIR, or --labels_from_folder no")
    return None
