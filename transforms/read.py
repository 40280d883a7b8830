"""Beam sources for weakloc: TFRecord shards and image files by glob, through Beam's FileSystems.

Both produce `RawInput` elements; anything that cannot be read becomes a failure row on the `failures` output
instead of failing the bundle. Files are reshuffled before they are opened so that shards spread over workers.
"""
from __future__ import annotations

import logging
import os
import posixpath
import stat

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from weakloc.models import defaults, records
from weakloc.models.reading import RawInput
from weakloc.models.files import open_maybe_gzip
from weakloc.models.schema import failure_row

from .tags import FAILURES, NAMESPACE, SKIPPED

logger = logging.getLogger(__name__)



def printable_path(path: str) -> str:
    """A path as text that survives UTF-8 (undecodable bytes of a local file name shown as \\xNN escapes)."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from undecodable bytes
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


class _ListedPathDoFn(beam.DoFn):
    """A matched file -> (path, size), or a read failure row when the name cannot travel between steps.

    A local file name that is not valid UTF-8 reaches Python as a str with surrogate escapes; Beam's coders
    refuse to encode it and would fail the whole run, so it becomes a failure row naming it with escapes.
    """

    def __init__(self):
        self.read_failures = Metrics.counter(NAMESPACE, "read_failures")

    def process(self, meta):
        try:
            meta.path.encode("utf-8")
        except UnicodeEncodeError:
            self.read_failures.inc()
            shown = printable_path(meta.path)
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(
                shown, "read", "UnicodeEncodeError", "file name is not valid UTF-8 (shown with \\x escapes); "
                "rename it to be read", image_id=None))
            return
        if "://" not in meta.path and _is_special_file(meta.path):
            # A FIFO or device matched by a local glob would block (or never end) when read.
            self.read_failures.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(
                meta.path, "read", "NotARegularFile", "not a regular file (FIFO, socket or device); not read",
                image_id=None))
            return
        yield meta.path, meta.size_in_bytes


def _is_special_file(path: str) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # gone since listing: the open step reports it
        return False


class _ReadShardDoFn(beam.DoFn):
    """A TFRecord shard path -> one RawInput per record, and a failure row where the shard is damaged."""

    def __init__(self):
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.read_failures = Metrics.counter(NAMESPACE, "read_failures")

    def process(self, item):
        path, _ = item
        index = 0
        try:
            with open_maybe_gzip(path) as stream:
                for _, payload in records.iter_records(stream):
                    self.records_read.inc()
                    yield RawInput(source=f"{path}:{index}", kind="example", payload=payload)
                    index += 1
        except records.RecordError as exc:
            self.read_failures.inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES,
                failure_row(path, "read", exc, f"shard damaged after {index} good records, {exc}; "
                                                "the rest of the shard was not read"),
            )
        except Exception as exc:  # unreadable file, bad gzip stream, permission, ...
            self.read_failures.inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES,
                failure_row(path, "read", exc, f"cannot read shard after {index} records: {exc}"),
            )


class _ReadImageFileDoFn(beam.DoFn):
    """An image file path -> RawInput with its bytes (and its folder label in a class-per-folder layout)."""

    def __init__(self, folder_labels: bool, max_file_bytes: int = defaults.MAX_FILE_BYTES):
        self.folder_labels = folder_labels
        self.max_file_bytes = max_file_bytes
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.read_failures = Metrics.counter(NAMESPACE, "read_failures")

    def process(self, item, skip_ids=None):
        path, size = item
        if skip_ids is not None and path in skip_ids:
            # Already labelled by an earlier run (the id of an image file is its path): not even read.
            yield beam.pvalue.TaggedOutput(SKIPPED, path)
            return
        if size is not None and size > self.max_file_bytes:
            # Refused from the listing, before a byte is read: a stray huge file must not exhaust a worker.
            self.read_failures.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(
                path, "read", "FileTooLarge",
                f"file is {size} bytes, above the limit of {self.max_file_bytes} (set --max_file_bytes)",
                image_id=path))
            return
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
        except Exception as exc:
            self.read_failures.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure_row(path, "read", exc, image_id=path))
            return
        self.records_read.inc()
        label = posixpath.basename(posixpath.dirname(path)) if self.folder_labels else None
        yield RawInput(source=path, kind="image", payload=data, image_id=path, folder_label=label or None)


class ReadInputs(beam.PTransform):
    """File patterns -> PCollection[RawInput], with a `failures` output of failure rows and a `skipped` output.

    Args:
      patterns: file globs (local, gs://, s3://, ...).
      input_format: "tfrecord" or "images".
      folder_labels: for images, take the parent folder's name as the image-level label.
      max_file_bytes: image files listed as larger become failure rows without being read.
      skip_ids: a dict-like side input of image ids already labelled; image files whose path is in it go to the
        `skipped` output unread (TFRecord ids are only known after parsing: the decode step skips those).
    """

    def __init__(self, patterns, input_format: str, *, folder_labels: bool = False,
                 max_file_bytes: int = defaults.MAX_FILE_BYTES, skip_ids=None):
        super().__init__()
        if input_format not in ("tfrecord", "images"):
            raise ValueError(f"input_format must be 'tfrecord' or 'images', got {input_format!r}")
        self.patterns = list(patterns)
        self.input_format = input_format
        self.folder_labels = folder_labels
        self.max_file_bytes = max_file_bytes
        self.skip_ids = skip_ids

    def expand(self, pbegin):
        listed = (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> fileio.MatchAll()
            | "Paths" >> beam.ParDo(_ListedPathDoFn()).with_outputs(FAILURES, main="paths")
        )
        paths = (
            listed.paths
            # Overlapping patterns must not label (and count) a file twice.
            | "UniquePaths" >> beam.Distinct()
            # Without this a runner reads every file on the worker that matched the pattern.
            | "SpreadFiles" >> beam.Reshuffle()
        )
        fn = _ReadShardDoFn() if self.input_format == "tfrecord" else _ReadImageFileDoFn(
            self.folder_labels, self.max_file_bytes)
        side = {"skip_ids": self.skip_ids} if self.skip_ids is not None and self.input_format == "images" else {}
        opened = paths | "Open" >> beam.ParDo(fn, **side).with_outputs(FAILURES, SKIPPED, main="inputs")
        # Unlisted names are deduplicated too, so overlapping patterns give one failure row per bad name.
        bad_names = (
            listed[FAILURES]
            | "BadNameKeys" >> beam.Map(lambda row: (row["source"], row))
            | "UniqueBadNames" >> beam.CombinePerKey(lambda rows: next(iter(rows)))
            | "BadNameRows" >> beam.Values()
        )
        failures = (bad_names, opened[FAILURES]) | "ReadFailures" >> beam.Flatten()
        return {"inputs": opened.inputs, FAILURES: failures, SKIPPED: opened[SKIPPED]}
