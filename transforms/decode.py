"""Decode step: RawInput -> (ImageMeta, pixels at model input size), or a failure row. Never raises."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from weakloc.models import defaults
from weakloc.models.annotate import ImageMeta
from weakloc.models.reading import InputReader, Parsed, RawInput
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
        self._reader = None
        self._pending: collections.deque = collections.deque()

    def setup(self):
        from PIL import Image

        # Pillow refuses images above 2x its own limit at open; let --max_pixels be the only limit.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        self._reader = InputReader(self.class_names, input_size=self.input_size, label_offset=self.label_offset,
                                   max_pixels=self.max_pixels)
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

    def _start(self, raw, skip_ids) -> "_Work":
        """Parse and check one input here; hand its pixels to the pool. Returns what `_finish` completes."""
        try:
            parsed = self._reader.parse(raw)
        except Exception as exc:  # every reason becomes a row; the run goes on
            return _Work(raw, failure=failure_row(raw.source, "parse", exc, image_id=raw.image_id))
        if skip_ids is not None and raw.kind == "example" and parsed.image_id in skip_ids:
            return _Work(raw, parsed, skipped=True)
        if self._pool is not None:
            decoded = self._pool.submit(self._reader.decode, parsed)
        else:
            decoded = concurrent.futures.Future()
            try:
                decoded.set_result(self._reader.decode(parsed))
            except Exception as exc:  # raised again, as a failure row, by `_finish`
                decoded.set_exception(exc)
        return _Work(raw, parsed, decoded=decoded)

    def _finish(self, work: "_Work"):
        """Back in the bundle's thread (metrics live there): the outputs of one input."""
        if work.skipped:
            self.skipped.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, work.parsed.image_id)
            return
        if work.failure is not None:
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, work.failure)
            return
        try:
            meta, pixels = work.decoded.result()
        except Exception as exc:  # every reason becomes a row; the run goes on
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(work.raw.source, "decode", exc,
                                                                 image_id=work.parsed.image_id))
            return
        self.decoded.inc()
        yield DecodedInput(meta=meta, pixels=pixels)


@dataclasses.dataclass
class _Work:
    """One input between `_start` and `_finish`: skipped, failed (its failure row), or decoding."""

    raw: RawInput
    parsed: Optional[Parsed] = None
    skipped: bool = False
    failure: Optional[dict] = None
    decoded: Optional[concurrent.futures.Future] = None
