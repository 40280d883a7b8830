"""Reading labelled inputs outside Beam, for `train`, `calibrate` and `evaluate`: the same inputs `label` reads.

TFRecord shards (plain or GZIP, local or any Beam filesystem) of tf.train.Example in the TF Object Detection API
convention, or image files by glob with the label taken from the parent folder. Records stream one at a time so a
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

from weakloc.models import boxes, defaults, images, records
from weakloc.models.annotate import resolve_labels
from weakloc.models.files import open_maybe_gzip

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


@dataclasses.dataclass
class Source:
    """The files behind --input patterns, their format and the class names found in them."""

    files: list[str]
    input_format: str
    folder_labels: bool
    class_names: tuple[str, ...]
    count: int
    fingerprint: str  # sha256 (16 hex) of the sorted (id, labels) pairs: which data a model saw


def _match(patterns: Sequence[str]) -> list[str]:
    files = []
    for pattern in patterns:
        found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        if not found:
            raise OptionsError(f"--input {pattern!r} matches no file")
        files.extend(found)
    return list(dict.fromkeys(files))


def _raw_records(files: Sequence[str], input_format: str) -> Iterator[tuple[str, str, bytes, Optional[str]]]:
    """(kind, id, payload, folder label) of every record or image file; damaged shard tails are skipped."""
    for path in files:
        if input_format == "images":
            with FileSystems.open(path) as f:
                yield "image", path, f.read(), posixpath.basename(posixpath.dirname(path))
            continue
        with open_maybe_gzip(path) as stream:
            try:
                for i, (_, data) in enumerate(records.iter_records(stream)):
                    yield "example", f"{path}:{i}", data, None
            except (records.RecordError, EOFError, OSError) as exc:
                logger.warning("skipping the rest of %s: %s", path, exc)


def scan(
    patterns: Sequence[str],
    *,
    input_format: Optional[str] = None,
    labels_from_folder: str = "auto",
    class_names: Optional[Sequence[str]] = None,
    label_offset: int = 0,
) -> Source:
    """Match the patterns and read every label once (no pixel is decoded) to name the classes.

    Class names, unless given: the sorted folder names (images) or the sorted `image/class/text` values
    (TFRecord); with integer labels only, `class_0`... up to the largest label.
    """
    files = _match(patterns)
    fmt, folder = input_layout(patterns, input_format, labels_from_folder)
    texts, ints, keys = set(), set(), []
    for kind, rid, payload, folder_label in _raw_records(files, fmt):
        if kind == "image":
            lab = [folder_label] if folder else []
            texts.update(lab)
            keys.append(f"{rid}\t{','.join(lab)}")
            continue
        try:
            ex = records.parse_example(payload)
        except records.ExampleError as exc:
            logger.warning("skipping %s: %s", rid, exc)
            continue
        texts.update(ex.label_texts)
        ints.update(v - label_offset for v in ex.labels)
        keys.append(f"{ex.image_id or rid}\t{ex.labels}\t{ex.label_texts}")
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
            "images: a class-per-folder layout such as root/*/*.jpg)"
        )
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return Source(files, fmt, folder, names, len(keys), digest)


def iterate(
    source: Source,
    *,
    input_size: Optional[tuple[int, int]] = None,
    label_offset: int = 0,
    max_pixels: int = defaults.MAX_PIXELS,
) -> Iterator[Example]:
    """Every readable input as an Example; decoded to `input_size` when given (undecodable ones are skipped)."""
    for kind, rid, payload, folder_label in _raw_records(source.files, source.input_format):
        if kind == "image":
            label_ids, _ = resolve_labels([], [folder_label] if source.folder_labels else [], source.class_names)
            image_id, encoded, gt, gt_ids = rid, payload, np.zeros((0, 4), np.float32), []
        else:
            try:
                ex = records.parse_example(payload)
            except records.ExampleError:
                continue  # already reported by scan()
            image_id = ex.image_id or rid
            label_ids, _ = resolve_labels(ex.labels, ex.label_texts, source.class_names, id_offset=label_offset)
            gt_ids, _ = resolve_labels(ex.gt_labels, ex.gt_texts, source.class_names, id_offset=label_offset)
            encoded, gt = ex.encoded, np.asarray(ex.gt_boxes, np.float32).reshape(-1, 4)
        item = Example(image_id=image_id, label_ids=label_ids, gt_boxes=gt, gt_ids=gt_ids)
        if input_size is not None:
            try:
                img = images.decode_image(encoded, input_size, max_pixels=max_pixels)
            except images.ImageDecodeError as exc:
                logger.warning("skipping %s: %s", rid, exc)
                continue
            item.pixels, item.width, item.height = img.pixels, img.width, img.height
            if len(item.gt_boxes) and img.orientation != 1:
                # As the label pipeline's decode step: truth stored for the un-rotated grid turns with the picture.
                item.gt_boxes = boxes.orient_normalized_boxes(item.gt_boxes, img.orientation)
        yield item


def in_validation(image_id: str, percent: float) -> bool:
    """A stable split by content of the id (CRC32), so a streamed dataset splits the same way every epoch."""
    return (zlib.crc32(image_id.encode("utf-8")) % 10000) < percent * 100
