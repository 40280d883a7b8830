"""Write step: annotation and failure rows to Parquet (Beam's temp-then-rename), then `summary.json`.

The summary is written only after both Parquet writes have finalised (their file lists are side inputs), once and
in one atomic step (`publish_json`), so a run that dies half-way never leaves a summary that claims a complete
output: summary.json's appearance is the run's commit point.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
import uuid
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.metrics import Metrics

from weakloc.models import schema

from . import progress
from .tags import NAMESPACE


class _CountRows(beam.CombineFn):
    """Counts rows, boxes per class and failures per stage in one pass."""

    def create_accumulator(self):
        return {"rows": 0, "boxes": collections.Counter(), "stages": collections.Counter()}

    def add_input(self, acc, row):
        acc["rows"] += 1
        for box in row.get("boxes") or ():
            acc["boxes"][box["label"]] += 1
        if "stage" in row:
            acc["stages"][row["stage"]] += 1
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out["rows"] += acc["rows"]
            out["boxes"].update(acc["boxes"])
            out["stages"].update(acc["stages"])
        return out

    def extract_output(self, acc):
        return {"rows": acc["rows"], "boxes": dict(sorted(acc["boxes"].items())), "stages": dict(acc["stages"])}


class _Duplicates(beam.CombineFn):
    """(image_id, rows) pairs with rows > 1 -> how many ids repeat, how many rows they cover, a few examples."""

    EXAMPLES = 20

    def create_accumulator(self):
        return {"ids": 0, "rows": 0, "examples": []}

    def add_input(self, acc, kv):
        acc["ids"] += 1
        acc["rows"] += kv[1]
        acc["examples"] = sorted(acc["examples"] + [list(kv)])[: self.EXAMPLES]
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out["ids"] += acc["ids"]
            out["rows"] += acc["rows"]
            out["examples"] = sorted(out["examples"] + acc["examples"])[: self.EXAMPLES]
        return out

    def extract_output(self, acc):
        return {"ids": acc["ids"], "rows": acc["rows"],
                "examples": [{"image_id": i, "rows": n} for i, n in acc["examples"]]}


def _row_ids(row):
    if row.get("image_id") is not None:
        yield row["image_id"]


# Object stores publish an object only when its upload completes, whole or not at all: there, writing in place
# is the atomic step (a temp object renamed would be a copy and a delete, two writes instead of one).
_OBJECT_STORES = ("gs", "s3", "azfs")


def publish_json(path: str, doc: dict) -> None:
    """Make `path` appear holding `doc`, whole, in one step; a reader sees no file or the complete file.

    Local disk: written beside it and moved over it with `os.replace` (atomic within a filesystem on POSIX and
    Windows). gs://, s3://, azfs://: written in place (the object becomes visible when its upload completes).
    Other filesystems (HDFS, ...): written beside and renamed, which their rename makes atomic.
    """
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    fs = FileSystems.get_filesystem(path)
    if isinstance(fs, LocalFileSystem):
        local = path[len("file://"):] if path.startswith("file://") else path
        tmp = f"{local}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    elif fs.scheme() in _OBJECT_STORES:
        with FileSystems.create(path) as f:
            f.write(data)
    else:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with FileSystems.create(tmp) as f:
            f.write(data)
        FileSystems.rename([tmp], [path])


def _write_summary(_, path, annotations, failures, records, skipped, duplicates, annotation_files, failure_files,
                   header, started):
    # `read` is counted where inputs enter (records emitted, image files skipped unread as already labelled, and
    # inputs that could not be read at all), so the balance below is a check, not a definition. A damaged
    # shard's unread tail is one read failure.
    log = logging.getLogger(__name__)
    read = records + failures["stages"].get("read", 0)
    balanced = read == annotations["rows"] + failures["rows"] + skipped
    if not balanced:
        log.error("accounting mismatch: %d inputs read but %d annotated + %d failed + %d skipped", read,
                  annotations["rows"], failures["rows"], skipped)
    if duplicates["ids"]:
        log.warning("%d image ids occur in more than one row (%d rows), e.g. %r; rows are kept, not merged",
                    duplicates["ids"], duplicates["rows"], duplicates["examples"][0]["image_id"])
    doc = dict(header)
    doc.update(
        {
            "counts": {
                "read": read,
                "balanced": balanced,
                "annotated": annotations["rows"],
                "failed": failures["rows"],
                "skipped_labeled": skipped,
                "failed_by_stage": failures["stages"],
                "boxes": sum(annotations["boxes"].values()),
                "boxes_per_class": annotations["boxes"],
                "duplicate_ids": duplicates,
            },
            "files": {"annotations": sorted(annotation_files), "failures": sorted(failure_files)},
            "wall_time_s": round(time.time() - started, 3),
        }
    )
    # The run's single commit point: written once, after both tables have finalised (side inputs below).
    publish_json(path, doc)
    yield path


class _CountOut(beam.DoFn):
    def __init__(self, name):
        self.name = name
        self.counter = Metrics.counter(NAMESPACE, name)
        self.boxes = Metrics.counter(NAMESPACE, "boxes_written")

    def process(self, row):
        self.counter.inc()
        progress.LOCAL.add(self.name)
        if self.name == "annotations_written":
            self.boxes.inc(len(row["boxes"]))
        yield row


class WriteOutputs(beam.PTransform):
    """(annotations, failures, inputs, skipped) -> annotations-*.parquet, failures-*.parquet, summary.json in `output`.

    `inputs` holds one element per input that entered the run (its count is `read`); `skipped` one per input
    left out because an earlier output already labelled it (`--skip_labeled`).

    Args:
      output: a directory path on any Beam filesystem.
      header: JSON-safe dict written at the top of summary.json (model fingerprint, options, ...).
      emit_cams: whether annotation rows carry the `cams` column.
      num_shards: 0 lets the runner decide.
    """

    def __init__(self, output: str, header: dict[str, Any], *, emit_cams: bool = False, num_shards: int = 0):
        super().__init__()
        self.output = output.rstrip("/")
        self.header = header
        self.emit_cams = emit_cams
        self.num_shards = num_shards
        self.started = time.time()

    def expand(self, pcolls):
        annotations, failures, inputs, skipped = pcolls
        join = FileSystems.join
        annotations = annotations | "CountAnnotations" >> beam.ParDo(_CountOut("annotations_written"))
        failures = failures | "CountFailures" >> beam.ParDo(_CountOut("failures_written"))
        ann_files = annotations | "WriteAnnotations" >> beam.io.WriteToParquet(
            join(self.output, "annotations"),
            schema.annotation_schema(self.emit_cams),
            file_name_suffix=".parquet",
            num_shards=self.num_shards,
            codec="snappy",
        )
        fail_files = failures | "WriteFailures" >> beam.io.WriteToParquet(
            join(self.output, "failures"),
            schema.FAILURE_SCHEMA,
            file_name_suffix=".parquet",
            num_shards=self.num_shards,
            codec="snappy",
        )
        ann_counts = annotations | "SummariseAnnotations" >> beam.CombineGlobally(_CountRows())
        fail_counts = failures | "SummariseFailures" >> beam.CombineGlobally(_CountRows())
        input_count = inputs | "CountInputs" >> beam.combiners.Count.Globally()
        skipped_count = skipped | "CountSkipped" >> beam.combiners.Count.Globally()
        # Duplicate image ids (two records with one source_id, say) are reported, never merged: every row stays.
        duplicates = (
            (annotations | "AnnotationIds" >> beam.FlatMap(_row_ids),
             failures | "FailureIds" >> beam.FlatMap(_row_ids))
            | "AllIds" >> beam.Flatten()
            | "RowsPerId" >> beam.combiners.Count.PerElement()
            | "Repeated" >> beam.Filter(lambda kv: kv[1] > 1)
            | "SummariseDuplicates" >> beam.CombineGlobally(_Duplicates())
        )
        return (
            annotations.pipeline
            | "SummaryTrigger" >> beam.Create([None])
            | "WriteSummary"
            >> beam.FlatMap(
                _write_summary,
                join(self.output, "summary.json"),
                beam.pvalue.AsSingleton(ann_counts),
                beam.pvalue.AsSingleton(fail_counts),
                beam.pvalue.AsSingleton(input_count),
                beam.pvalue.AsSingleton(skipped_count),
                beam.pvalue.AsSingleton(duplicates),
                beam.pvalue.AsList(ann_files),
                beam.pvalue.AsList(fail_files),
                self.header,
                self.started,
            )
        )
