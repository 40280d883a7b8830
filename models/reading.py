"""From one raw input (a TFRecord record or an image file's bytes) to its metadata and pixels: the one reader.

`label`'s decode step and the readers of `train`, `calibrate` and `evaluate` all go through `InputReader`, so every
command sees an input exactly as `label` does: the same image id, the same labels, the same ground truth turned
with the picture's EXIF orientation, the same pixels.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from . import boxes, defaults, images, records
from .annotate import ImageMeta, resolve_labels


@dataclasses.dataclass
class RawInput:
    """One input before decoding.

    source: where it came from (`shard:index` for TFRecord records, the path for image files).
    kind: "example" (payload is a serialized tf.train.Example) or "image" (payload is the file's bytes).
    image_id: known before parsing (image files: the path), else None.
    folder_label: the class-per-folder label of an image file, else None.
    """

    source: str
    kind: str
    payload: bytes
    image_id: Optional[str] = None
    folder_label: Optional[str] = None


@dataclasses.dataclass
class Parsed:
    """An input parsed but not decoded: its id, labels (model class ids, -1 unknown, and texts), the encoded
    picture and its ground truth (normalised x0y0x1y1 boxes of the stored pixel grid, class ids, texts)."""

    source: str
    image_id: str
    label_ids: list[int]
    label_texts: list[str]
    encoded: bytes
    gt_boxes: list = dataclasses.field(default_factory=list)
    gt_ids: list[int] = dataclasses.field(default_factory=list)
    gt_texts: list[str] = dataclasses.field(default_factory=list)


class InputReader:
    """Parses and decodes inputs for one model's class names and input size.

    Example:
      reader = InputReader(("cat", "dog"), input_size=(96, 96))
      meta, pixels = reader.decode(reader.parse(raw))   # ImageMeta, uint8 (96, 96, 3)
    """

    def __init__(self, class_names: Sequence[str], *, input_size: tuple[int, int], label_offset: int = 0,
                 max_pixels: int = defaults.MAX_PIXELS):
        self.class_names = tuple(class_names)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.label_offset = int(label_offset)
        self.max_pixels = int(max_pixels)
        # Built once: resolving labels against 1,000 ImageNet names per record costs more than the lookup.
        self._index = {n: i for i, n in enumerate(self.class_names)}

    def parse(self, raw: RawInput) -> Parsed:
        """The labels and ground truth of `raw`. Raises records.ExampleError (or another parse error)."""
        if raw.kind != "example":
            labels = [raw.folder_label] if raw.folder_label else []
            label_ids, label_texts = resolve_labels([], labels, self.class_names, index=self._index)
            return Parsed(raw.source, raw.image_id or raw.source, label_ids, label_texts, raw.payload)
        ex = records.parse_example(raw.payload)
        label_ids, label_texts = resolve_labels(ex.labels, ex.label_texts, self.class_names,
                                                id_offset=self.label_offset, index=self._index)
        gt_ids, _ = resolve_labels(ex.gt_labels, ex.gt_texts, self.class_names, id_offset=self.label_offset,
                                   index=self._index)
        return Parsed(raw.source, ex.image_id or raw.source, label_ids, label_texts, ex.encoded,
                      list(ex.gt_boxes), gt_ids, list(ex.gt_texts))

    def decode(self, parsed: Parsed) -> tuple[ImageMeta, np.ndarray]:
        """(metadata with the picture's size and oriented ground truth, uint8 (H_in, W_in, 3) pixels).

        Raises:
          images.ImageDecodeError: the bytes are not a picture, or one larger than max_pixels.
        """
        img = images.decode_image(parsed.encoded, self.input_size, max_pixels=self.max_pixels)
        gt_boxes = parsed.gt_boxes
        if len(gt_boxes) and img.orientation != 1:
            # Ground truth is normalised to the stored grid (TensorFlow's decoders ignore EXIF); boxes are
            # reported on the picture a viewer sees, so the truth turns with it.
            gt_boxes = boxes.orient_normalized_boxes(gt_boxes, img.orientation).tolist()
        meta = ImageMeta(image_id=parsed.image_id, source=parsed.source, width=img.width, height=img.height,
                         label_ids=parsed.label_ids, label_texts=parsed.label_texts, gt_boxes=list(gt_boxes),
                         gt_ids=parsed.gt_ids, gt_texts=parsed.gt_texts)
        return meta, img.pixels
