"""summary.json: a labelling run's record and its single commit point, declared once.

    {...the header LabelConfig.header() knows before the run (version, inputs, model, options, engine)...,
     "counts": {"read", "balanced", "annotated", "failed", "skipped_labeled", "failed_by_stage", "boxes",
                "boxes_per_class", "duplicate_ids"},
     "files": {"annotations": [...], "failures": [...]},
     "wall_time_s": 12.3}

It is written once, after both tables are final (transforms/write.py); its appearance is what tells a reader the
run finished. The runner's own metrics go to metrics.json beside it (pipeline/results.read_summary joins them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUMMARY = "summary.json"
METRICS = "metrics.json"


class SummaryError(ValueError):
    """A summary.json that is not a weakloc run's record."""


@dataclasses.dataclass(frozen=True)
class Counts:
    """Every input accounted for: read == annotated + failed + skipped_labeled when `balanced`."""

    read: int
    balanced: bool
    annotated: int
    failed: int
    skipped_labeled: int
    failed_by_stage: Mapping[str, int]
    boxes: int
    boxes_per_class: Mapping[str, int]
    duplicate_ids: Mapping[str, Any]

    @classmethod
    def from_tallies(cls, *, records: int, annotations: Mapping[str, Any], failures: Mapping[str, Any],
                     skipped: int, duplicates: Mapping[str, Any]) -> "Counts":
        """`read` is counted where inputs enter (records emitted, image files skipped unread as already labelled,
        and inputs that could not be read at all), so the balance is a check, not a definition. A damaged shard's
        unread tail is one read failure."""
        read = records + failures["stages"].get("read", 0)
        return cls(read=read, balanced=read == annotations["rows"] + failures["rows"] + skipped,
                   annotated=annotations["rows"], failed=failures["rows"], skipped_labeled=skipped,
                   failed_by_stage=dict(failures["stages"]), boxes=sum(annotations["boxes"].values()),
                   boxes_per_class=dict(annotations["boxes"]), duplicate_ids=dict(duplicates))


@dataclasses.dataclass(frozen=True)
class RunSummary:
    header: Mapping[str, Any]
    counts: Counts
    files: Mapping[str, list]
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.header)
        doc.update(counts=dataclasses.asdict(self.counts), files=dict(self.files), wall_time_s=self.wall_time_s)
        return doc

    @classmethod
    def from_json(cls, doc, *, where: str = SUMMARY) -> "RunSummary":
        if not isinstance(doc, dict) or not isinstance(doc.get("counts"), dict):
            raise SummaryError(f"{where} is not a weakloc run summary (no counts)")
        names = [f.name for f in dataclasses.fields(Counts)]
        missing = [n for n in names if n not in doc["counts"]]
        if missing:
            raise SummaryError(f"{where}: counts lack {missing}")
        header = {k: v for k, v in doc.items() if k not in ("counts", "files", "wall_time_s")}
        return cls(header, Counts(**{n: doc["counts"][n] for n in names}), doc.get("files") or {},
                   doc.get("wall_time_s"))
