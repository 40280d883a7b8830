"""Decode step: RawInput -> (ImageMeta, pixels at model input size), or a failure row. Never raises."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from weakloc.models import boxes, images, records
from weakloc.models.annotate import ImageMeta, resolve_labels
from weakloc.models.schema import failure_row

from .read import FAILURES, NAMESPACE, SKIPPED


@dataclasses.dataclass
class DecodedInput:
    """What the inference step batches: the picture at model input size and its metadata."""

    meta: ImageMeta
    pixels: np.ndarray  # uint8 (H_in, W_in, 3)


class DecodeDoFn(beam.DoFn):
    """Parse (for TFRecord) and decode each input; bad ones go to the `failures` output with the reason.

    With a `skip_ids` side input (--skip_labeled), a record whose image id is in it goes to the `skipped`
    output, parsed but not decoded.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        class_names: Sequence[str],
        *,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
        label_offset: int = 0,
    ):
        self.input_size = tuple(input_size)
        self.class_names = tuple(class_names)
        self.max_pixels = max_pixels
        self.label_offset = label_offset
        self.decoded = Metrics.counter(NAMESPACE, "images_decoded")
        self.failed = Metrics.counter(NAMESPACE, "decode_failures")
        self.skipped = Metrics.counter(NAMESPACE, "skipped_labeled")

    def setup(self):
        from PIL import Image

        # Pillow refuses images above 2x its own limit at open; let --max_pixels be the only limit.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels

    def process(self, raw, skip_ids=None):
        image_id = raw.image_id
        stage = "parse"
        try:
            if raw.kind == "example":
                ex = records.parse_example(raw.payload)
                image_id = ex.image_id or raw.source
                if skip_ids is not None and image_id in skip_ids:
                    self.skipped.inc()
                    yield beam.pvalue.TaggedOutput(SKIPPED, image_id)
                    return
                label_ids, label_texts = resolve_labels(
                    ex.labels, ex.label_texts, self.class_names, id_offset=self.label_offset
                )
                gt_ids, _ = resolve_labels(ex.gt_labels, ex.gt_texts, self.class_names, id_offset=self.label_offset)
                encoded, gt = ex.encoded, (ex.gt_boxes, gt_ids, ex.gt_texts)
            else:
                labels = [raw.folder_label] if raw.folder_label else []
                label_ids, label_texts = resolve_labels([], labels, self.class_names)
                encoded, gt = raw.payload, ([], [], [])
            stage = "decode"
            img = images.decode_image(encoded, self.input_size, max_pixels=self.max_pixels)
            if gt[0] and img.orientation != 1:
                # Ground truth is normalised to the stored grid (TensorFlow's decoders ignore EXIF); boxes are
                # reported on the picture a viewer sees, so the truth turns with it.
                gt = (boxes.orient_normalized_boxes(gt[0], img.orientation).tolist(), gt[1], gt[2])
        except Exception as exc:  # every reason becomes a row; the run goes on
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(raw.source, stage, exc, image_id=image_id))
            return
        self.decoded.inc()
        meta = ImageMeta(
            image_id=image_id,
            source=raw.source,
            width=img.width,
            height=img.height,
            label_ids=label_ids,
            label_texts=label_texts,
            gt_boxes=gt[0],
            gt_ids=gt[1],
            gt_texts=gt[2],
        )
        yield DecodedInput(meta=meta, pixels=img.pixels)
