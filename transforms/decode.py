"""Decode step: RawInput -> (ImageMeta, pixels at model input size), or a failure row. Never raises."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from weakloc.models import boxes, defaults, images, records
from weakloc.models.annotate import ImageMeta, resolve_labels
from weakloc.models.schema import failure_row

from .tags import FAILURES, NAMESPACE, SKIPPED


@dataclasses.dataclass
class DecodedInput:
    """What the inference step batches: the picture at model input size and its metadata."""

    meta: ImageMeta
    pixels: np.ndarray  # uint8 (H_in, W_in, 3)




class DecodeDoFn(beam.DoFn):
    """Parse (for TFRecord) and decode each input; bad ones go to the `failures` output with the reason.

    With a `skip_ids` side input (--skip_labeled), a record whose image id is in it goes to the `skipped`
    output, parsed but not decoded.

    Parsing, the skip check and the labels run in the bundle's thread; the pixels are decoded by a pool of
    `threads` threads, at most `window` inputs ahead. Outputs leave in input order, each in the window and with
    the timestamp of its own input, and `finish_bundle` emits whatever is still in flight, so threading changes
    when an output appears, never what it is. With `threads=0` each input is decoded in the bundle's thread and
    its output leaves at once.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        class_names: Sequence[str],
        *,
        max_pixels: int = defaults.MAX_PIXELS,
        label_offset: int = 0,
        threads: int = defaults.DECODE_THREADS,
        window: int = defaults.DECODE_WINDOW,
    ):
        if threads < 0:
            raise ValueError(f"decode threads must be >= 0, got {threads}")
        if window < 1:
            raise ValueError(f"decode window must be >= 1, got {window}")
        self.input_size = tuple(input_size)
        self.class_names = tuple(class_names)
        self.max_pixels = max_pixels
        self.label_offset = label_offset
        self.threads = int(threads)
        self.window = int(window)
        self.decoded = Metrics.counter(NAMESPACE, "images_decoded")
        self.failed = Metrics.counter(NAMESPACE, "decode_failures")
        self.skipped = Metrics.counter(NAMESPACE, "skipped_labeled")
        self._pool = None
        self._index = None
        self._pending: collections.deque = collections.deque()

    def setup(self):
        from PIL import Image

        # Pillow refuses images above 2x its own limit at open; let --max_pixels be the only limit.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        # Built once: resolving labels against 1,000 ImageNet names per record costs more than the lookup.
        self._index = {n: i for i, n in enumerate(self.class_names)}
        if self.threads:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="weakloc-decode")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start_bundle(self):
        self._pending = collections.deque()

    # The side input comes last: Beam fills the window and timestamp by position, and a missing side input
    # before them would shift them into the wrong parameters.
    def process(self, raw, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam, skip_ids=None):
        if self._pool is None:
            yield from self._finish(self._start(raw, skip_ids))
            return
        self._pending.append((self._start(raw, skip_ids), timestamp, window))
        while len(self._pending) > self.window:
            yield from self._finish_oldest()

    def finish_bundle(self):
        while self._pending:
            yield from self._finish_oldest()

    def _finish_oldest(self):
        work, timestamp, window = self._pending.popleft()
        for out in self._finish(work):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, (window,)))
            else:
                yield WindowedValue(out, timestamp, (window,))

    def _start(self, raw, skip_ids):
        """Parse and check one input here; hand its pixels to the pool. Returns what `_finish` completes."""
        image_id = raw.image_id
        try:
            if raw.kind == "example":
                ex = records.parse_example(raw.payload)
                image_id = ex.image_id or raw.source
                if skip_ids is not None and image_id in skip_ids:
                    return ("skipped", image_id)
                label_ids, label_texts = resolve_labels(
                    ex.labels, ex.label_texts, self.class_names, id_offset=self.label_offset, index=self._index
                )
                gt_ids, _ = resolve_labels(ex.gt_labels, ex.gt_texts, self.class_names, id_offset=self.label_offset,
                                           index=self._index)
                encoded, gt = ex.encoded, (ex.gt_boxes, gt_ids, ex.gt_texts)
            else:
                labels = [raw.folder_label] if raw.folder_label else []
                label_ids, label_texts = resolve_labels([], labels, self.class_names, index=self._index)
                encoded, gt = raw.payload, ([], [], [])
        except Exception as exc:  # every reason becomes a row; the run goes on
            return ("failed", failure_row(raw.source, "parse", exc, image_id=image_id))
        if self._pool is not None:
            pixels = self._pool.submit(self._decode, encoded, gt)
        else:
            pixels = concurrent.futures.Future()
            try:
                pixels.set_result(self._decode(encoded, gt))
            except Exception as exc:  # raised again, as a failure row, by `_finish`
                pixels.set_exception(exc)
        return ("decoding", raw, image_id, label_ids, label_texts, pixels)

    def _decode(self, encoded, gt):
        """In a pool thread: bytes -> (DecodedImage, ground truth on the picture a viewer sees)."""
        img = images.decode_image(encoded, self.input_size, max_pixels=self.max_pixels)
        if gt[0] and img.orientation != 1:
            # Ground truth is normalised to the stored grid (TensorFlow's decoders ignore EXIF); boxes are
            # reported on the picture a viewer sees, so the truth turns with it.
            gt = (boxes.orient_normalized_boxes(gt[0], img.orientation).tolist(), gt[1], gt[2])
        return img, gt

    def _finish(self, work):
        """Back in the bundle's thread (metrics live there): the outputs of one input."""
        if work[0] == "skipped":
            self.skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, work[1])
            return
        if work[0] == "failed":
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, work[1])
            return
        _, raw, image_id, label_ids, label_texts, pixels = work
        try:
            img, gt = pixels.result()
        except Exception as exc:  # every reason becomes a row; the run goes on
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(raw.source, "decode", exc, image_id=image_id))
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
