"""Weak boxes to detector formats: one filter for every format, then COCO, YOLO, Pascal VOC and TF Object Detection.

Rows are annotation-table rows (schema.ANNOTATION_SCHEMA). weakloc boxes are x0y0x1y1 in original image pixels,
continuous, max edge exclusive (pixel (i, j) covers [j, j+1) x [i, i+1)). What each format gets:

  COCO   bbox [x, y, w, h], the same continuous pixels: x = x0, y = y0, w = x1 - x0, h = y1 - y0; area = w * h.
  YOLO   `class cx cy w h`, normalised by the image width and height; class is the 0-based category index.
  VOC    1-based inclusive pixel indices: xmin = round(x0) + 1, xmax = round(x1) (so the one-pixel box
         (j, i, j+1, i+1) is xmin = xmax = j + 1), clipped to [1, width]; reading VOC back is x0 = xmin - 1, x1 = xmax.
  TF OD  image/object/bbox/* = x0 / width, y0 / height, x1 / width, y1 / height; labels 1-based as label maps are.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import posixpath
import re
import zlib
import xml.etree.ElementTree as ET
from typing import Iterable, Mapping, Optional, Sequence

FORMATS = ("coco", "yolo", "voc", "tfrecord")


class ExportError(ValueError):
    """Export settings that cannot work (a bad filter value or class map); the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class ExportFilter:
    """Which boxes leave weakloc, the same for every format.

    min_score: class probability (the box's `score`) at least this.
    min_cam_score: mean normalised CAM inside the box at least this.
    min_side: box width and height, in original pixels, at least this.
    min_area, max_area: box area as a fraction of the image area, within [min_area, max_area].
    class_map: model class name -> exported name; several names may map to one; None (or "") drops the class.
      Classes not named keep their name.
    keep_empty: keep images left without boxes (most detector libraries read them as pure background, which a
      weak label does not promise, so they are left out by default).
    """

    min_score: float = 0.0
    min_cam_score: float = 0.0
    min_side: float = 0.0
    min_area: float = 0.0
    max_area: float = 1.0
    class_map: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    keep_empty: bool = False

    def __post_init__(self):
        for name in ("min_score", "min_cam_score", "min_area", "max_area"):
            val = getattr(self, name)
            if not 0.0 <= float(val) <= 1.0:
                raise ExportError(f"--{name} must be within [0, 1], got {val}")
        if self.min_side < 0:
            raise ExportError(f"--min_side must be >= 0 pixels, got {self.min_side}")
        if self.min_area > self.max_area:
            raise ExportError(f"--min_area {self.min_area} is above --max_area {self.max_area}")

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), class_map=dict(self.class_map))


def parse_class_map(text: str, class_names: Sequence[str]) -> dict[str, Optional[str]]:
    """`{"cat": "animal", "bird": null}` (JSON) or `cat=animal,bird=` -> {model name: new name or None}.

    Raises:
      ExportError: malformed text, or a name that is not a class of the model.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"--class_map is not valid JSON: {exc}") from exc
        if not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in doc.items()):
            raise ExportError('--class_map JSON must map names to names or null, e.g. {"cat": "animal", "bird": null}')
    else:
        doc = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in pair:
                raise ExportError(f"--class_map expects name=new_name pairs separated by commas, got {pair!r}")
            old, new = (s.strip() for s in pair.split("=", 1))
            doc[old] = new
    unknown = sorted(set(doc) - set(class_names))
    if unknown:
        raise ExportError(f"--class_map names {unknown} are not classes of the model {list(class_names)}")
    return {k: (v or None) for k, v in doc.items()}


def categories_for(class_names: Sequence[str], class_map: Mapping[str, Optional[str]]) -> list[str]:
    """Exported category names: mapped names in the model's class order, first appearance wins, dropped left out.

    They depend on the model alone (not on which boxes survive), so category ids are stable between exports.
    """
    out: dict[str, None] = {}
    for name in class_names:
        new = class_map.get(name, name)
        if new:
            out.setdefault(new, None)
    return list(out)


@dataclasses.dataclass(frozen=True)
class ExportBox:
    """A box in original pixels, x0y0x1y1, continuous, max edge exclusive; category is the 0-based index."""

    category: int
    name: str
    xyxy: tuple[float, float, float, float]
    score: Optional[float] = None
    cam_score: Optional[float] = None


@dataclasses.dataclass
class ExportImage:
    """file_name: where the export put a copy of the picture (relative to the export folder), if it did."""

    image_id: str
    source: str
    width: int
    height: int
    boxes: list[ExportBox]
    gt_boxes: list[ExportBox]
    file_name: Optional[str] = None


@dataclasses.dataclass
class ExportSet:
    """What every format writes: categories, images (sorted by id) and the counts of what the filter did."""

    categories: list[str]
    images: list[ExportImage]
    counts: dict


def _clip(xyxy, width, height) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def select(rows: Iterable[dict], class_names: Sequence[str], flt: ExportFilter) -> ExportSet:
    """Apply `flt` to annotation rows; the one place where boxes are kept or dropped for every format.

    Predicted boxes go through the class map, then the score, CAM-score and size filters (each dropped box is
    counted under the first reason). Ground-truth boxes (carried from the input) only go through the class map:
    a threshold meant for weak boxes must not change the reference they are judged against.
    """
    categories = categories_for(class_names, flt.class_map)
    index = {n: i for i, n in enumerate(categories)}
    known = set(class_names)
    dropped = {"class": 0, "score": 0, "cam_score": 0, "size": 0, "area": 0}
    counts = {"images_in": 0, "boxes_in": 0, "boxes_out": 0, "gt_boxes_out": 0, "gt_boxes_dropped": 0,
              "images_without_boxes": 0}

    def category(name: Optional[str]) -> Optional[int]:
        new = flt.class_map.get(name, name) if name in known else None
        return index.get(new) if new else None

    images = []
    for row in rows:
        counts["images_in"] += 1
        w, h = int(row["width"]), int(row["height"])
        kept = []
        for b in row.get("boxes") or []:
            counts["boxes_in"] += 1
            cat = category(b["label"])
            xyxy = _clip((b["xmin"], b["ymin"], b["xmax"], b["ymax"]), w, h)
            bw, bh = xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]
            area = bw * bh / float(w * h) if w * h > 0 else 0.0
            if cat is None:
                dropped["class"] += 1
            elif b["score"] < flt.min_score:
                dropped["score"] += 1
            elif (b.get("cam_score") or 0.0) < flt.min_cam_score:
                dropped["cam_score"] += 1
            elif bw <= 0 or bh <= 0 or min(bw, bh) < flt.min_side:
                dropped["size"] += 1
            elif not flt.min_area <= area <= flt.max_area:
                dropped["area"] += 1
            else:
                kept.append(ExportBox(cat, categories[cat], xyxy, float(b["score"]), b.get("cam_score")))
        gts = []
        for g in row.get("gt_boxes") or []:
            name = g["label"] if g["label"] in known else (
                class_names[g["class_id"]] if 0 <= g["class_id"] < len(class_names) else None)
            cat = category(name)
            if cat is None:
                counts["gt_boxes_dropped"] += 1
                continue
            gts.append(ExportBox(cat, categories[cat], _clip((g["xmin"], g["ymin"], g["xmax"], g["ymax"]), w, h)))
        counts["boxes_out"] += len(kept)
        counts["gt_boxes_out"] += len(gts)
        if not kept:
            counts["images_without_boxes"] += 1
            if not flt.keep_empty:
                continue
        images.append(ExportImage(row["image_id"], row["source"], w, h, kept, gts))
    images.sort(key=lambda im: im.image_id)
    counts["images_out"] = len(images)
    counts["boxes_dropped"] = dropped
    return ExportSet(categories, images, counts)


# ---------------------------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_EXT = re.compile(r"\.(jpe?g|png|bmp|gif|webp|tiff?)$", re.IGNORECASE)


_RECORD_ID = re.compile(r":\d+$")  # `shard:index`, the id of a TFRecord record


def safe_stem(image_id: str, *, max_chars: int = 80) -> str:
    """A file name stem for an image id that can never leave the output folder and never collides.

    Ids are paths or URLs (`../../etc/x`, `gs://b/a.jpg`, `C:\\x`): every run of characters outside
    [A-Za-z0-9._-] becomes `_`, leading dots and dashes go, a known image extension goes, the readable part keeps
    its last `max_chars` characters, and 10 hex digits of the id's SHA-256 follow, so distinct ids (`a/b` and
    `a_b`) get distinct names and the same id always gets the same one.
    """
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    readable = _UNSAFE.sub("_", _IMAGE_EXT.sub("", image_id)).strip("._-")
    readable = readable[-max_chars:].lstrip("._-")
    return f"{readable}-{digest}" if readable else digest


def common_root(images: Sequence[tuple[str, str]]) -> str:
    """The folder every picture read from a file shares ((image id, source) pairs whose id is its file path);
    "" when none is a file or they share nothing. TFRecord records (`shard:index`) never count."""
    files = [i for i, src in images if i == src and not _RECORD_ID.search(i)]
    if not files:
        return ""
    try:
        root = posixpath.commonpath(files) if len(files) > 1 else posixpath.dirname(files[0])
    except ValueError:  # absolute and relative paths mixed
        return ""
    return "" if root in ("", "/") else root


def relative_id(image_id: str, root: str) -> str:
    """The id relative to `root` (as the user's own tree names the picture), or the id itself."""
    if root and image_id.startswith(root.rstrip("/") + "/"):
        return image_id[len(root.rstrip("/")) + 1:]
    return image_id


def export_stems(images: Sequence["ExportImage"]) -> dict[str, str]:
    """image id -> file stem: safe_stem of the path relative to the pictures' common folder, so
    /data/photos/fruit/test/apple_77.jpg under /data/photos becomes fruit_test_apple_77-<hash>, not a flattened
    absolute path."""
    root = common_root([(im.image_id, im.source) for im in images])
    return {im.image_id: safe_stem(relative_id(im.image_id, root)) for im in images}


def yolo_split(image_id: str, val_percent: float) -> str:
    """"val" for a stable `val_percent` share of ids (CRC32 of the id, as training's split), else "train"."""
    return "val" if zlib.crc32(image_id.encode("utf-8", "surrogatepass")) % 10000 < val_percent * 100 else "train"


def image_extension(image_id: str) -> str:
    m = _IMAGE_EXT.search(image_id)
    return m.group(0).lower() if m else ""


_MAGIC = ((b"\xff\xd8", "jpeg", ".jpg"), (b"\x89PNG", "png", ".png"), (b"GIF8", "gif", ".gif"), (b"BM", "bmp", ".bmp"),
          (b"II*\x00", "tiff", ".tif"), (b"MM\x00*", "tiff", ".tif"))


def sniff_format(data: bytes) -> tuple[str, str]:
    """(format name as TF OD's image/format spells it, file extension) from an image's first bytes; ("", "")
    when unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", ".webp"
    for magic, name, ext in _MAGIC:
        if data.startswith(magic):
            return name, ext
    return "", ""


# ---------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------


def coco_bbox(xyxy) -> list[float]:
    """x0y0x1y1 continuous pixels -> COCO [x, y, w, h] in the same continuous pixels."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


def _coco_images_and_categories(es: ExportSet) -> tuple[list[dict], list[dict]]:
    images = [{"id": i + 1, "file_name": im.file_name or im.image_id, "width": im.width, "height": im.height,
               "weakloc_source": im.source} for i, im in enumerate(es.images)]
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(es.categories)]
    return images, categories


def coco_dataset(es: ExportSet, *, ground_truth: bool = False, description: str = "weakloc export") -> dict:
    """A COCO detection dataset (image ids and category ids are 1-based, in ExportSet order).

    ground_truth=False: the weak boxes (with their score and cam_score as extra keys, which COCO readers ignore);
    True: the ground-truth boxes the input carried.
    """
    images, categories = _coco_images_and_categories(es)
    annotations = []
    for i, im in enumerate(es.images):
        for b in im.gt_boxes if ground_truth else im.boxes:
            x, y, w, h = coco_bbox(b.xyxy)
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": b.category + 1,
                   "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            if not ground_truth:
                ann["score"] = b.score
                ann["cam_score"] = b.cam_score
            annotations.append(ann)
    return {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}


def coco_results(es: ExportSet) -> list[dict]:
    """COCO detection results (what COCO.loadRes and COCOeval take): the weak boxes with score = class probability."""
    return [{"image_id": i + 1, "category_id": b.category + 1, "bbox": coco_bbox(b.xyxy), "score": b.score}
            for i, im in enumerate(es.images) for b in im.boxes]


# ---------------------------------------------------------------------------------------------------------------
# YOLO
# ---------------------------------------------------------------------------------------------------------------


def yolo_lines(im: ExportImage) -> str:
    """One `class cx cy w h` line per box, normalised to [0, 1] by the image size (Ultralytics/Darknet format)."""
    lines = []
    for b in im.boxes:
        x0, y0, x1, y1 = b.xyxy
        lines.append(f"{b.category} {(x0 + x1) / 2 / im.width:.6f} {(y0 + y1) / 2 / im.height:.6f} "
                     f"{(x1 - x0) / im.width:.6f} {(y1 - y0) / im.height:.6f}")
    return "".join(line + "\n" for line in lines)


def yolo_data_yaml(categories: Sequence[str], root: str) -> str:
    """Ultralytics data.yaml: `root` is the export folder, pictures in images/, labels in labels/.

    `root` should be absolute: Ultralytics resolves a relative `path` against its own datasets directory, not
    against the YAML file's folder.
    """
    import yaml

    doc = {"path": root, "train": "images/train", "val": "images/val", "nc": len(categories),
           "names": {i: n for i, n in enumerate(categories)}}
    return ("# written by weakloc export; each picture goes in images/<split>/ under the stem of its labels/<split>/\n"
            "# file (--copy_images puts it there); the split is stable (CRC32 of the image id); edit `path` if you\n"
            "# move this folder\n"
            + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------------------------------------------------------
# Pascal VOC
# ---------------------------------------------------------------------------------------------------------------


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def voc_box(xyxy, width: int, height: int) -> tuple[int, int, int, int]:
    """x0y0x1y1 continuous, max edge exclusive -> VOC (xmin, ymin, xmax, ymax), 1-based, inclusive.

    Pixel j (0-based) covers [j, j+1) and is pixel j + 1 in VOC, so the edges round to the nearest pixel
    boundary: xmin = round(x0) + 1, xmax = round(x1). Every box keeps at least one pixel and stays inside
    [1, width] x [1, height].
    """
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    xmin = min(max(_round_half_up(x0) + 1, 1), width)
    ymin = min(max(_round_half_up(y0) + 1, 1), height)
    xmax = min(max(_round_half_up(x1), xmin), width)
    ymax = min(max(_round_half_up(y1), ymin), height)
    return xmin, ymin, xmax, ymax


def voc_xml(im: ExportImage, filename: str) -> bytes:
    """Pascal VOC annotation XML for one image."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "images"
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(root, "path").text = im.image_id
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "weakloc"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(im.width)
    ET.SubElement(size, "height").text = str(im.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for b in im.boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = b.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        for key, val in zip(("xmin", "ymin", "xmax", "ymax"), voc_box(b.xyxy, im.width, im.height)):
            ET.SubElement(bnd, key).text = str(val)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------------------------
# TF Object Detection API
# ---------------------------------------------------------------------------------------------------------------


def tf_example(im: ExportImage, encoded: bytes, *, image_format: str = "") -> bytes:
    """A tf.train.Example in the TF Object Detection API convention, readable by `weakloc label`.

    Boxes normalised by the image size; object labels are 1-based category indices (label-map convention) with
    their names as text; the image-level labels are the distinct box categories.
    """
    from . import records

    cats = list(dict.fromkeys(b.category for b in im.boxes))
    return records.make_example(
        encoded,
        source_id=im.image_id,
        filename=im.image_id,
        labels=[c + 1 for c in cats],
        label_texts=[next(b.name for b in im.boxes if b.category == c) for c in cats],
        boxes=[[b.xyxy[0] / im.width, b.xyxy[1] / im.height, b.xyxy[2] / im.width, b.xyxy[3] / im.height]
               for b in im.boxes],
        box_labels=[b.category + 1 for b in im.boxes],
        box_texts=[b.name for b in im.boxes],
        width=im.width,
        height=im.height,
        image_format=image_format,
    )


def label_map_pbtxt(categories: Sequence[str]) -> str:
    """The TF Object Detection API label map (1-based ids) matching tf_example's labels."""
    return "".join(f"item {{\n  id: {i + 1}\n  name: {json.dumps(n)}\n}}\n" for i, n in enumerate(categories))
