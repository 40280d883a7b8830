"""Reading a run's outputs back (tests, the demo, and later evaluate/export): one table per kind, any filesystem."""
from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from weakloc.models import schema
from weakloc.models.summary import METRICS, SUMMARY, RunSummary, SummaryError


class IncompleteRunError(ValueError):
    """An output directory without summary.json: the run died, or is still finalising its files."""


class EmptyRunError(RuntimeError):
    """A run that finished but produced nothing usable (every input failed, or no image got a box).

    `text` is the run's own summary, printed before the one-line reason; the CLI exits 1."""

    def __init__(self, message: str, text: str = ""):
        super().__init__(message)
        self.text = text


def emptiness(summary: dict) -> str | None:
    """Why a finished label run is empty, or None: every input failed, or not one image got a box."""
    counts = summary.get("counts") or {}
    read, annotated, failed = counts.get("read", 0), counts.get("annotated", 0), counts.get("failed", 0)
    skipped = counts.get("skipped_labeled", 0)
    if read and annotated == 0 and failed and failed + skipped >= read:
        stages = ", ".join(f"{k} {v}" for k, v in sorted((counts.get("failed_by_stage") or {}).items()))
        return f"every input failed ({failed} of {read}: {stages}); see failures-*.parquet; --allow_empty accepts an empty run"
    if annotated and not counts.get("boxes"):
        return (f"no image got a box ({annotated} images annotated, 0 boxes): check --classes, --min_score and the "
                "labels (a --classes labels run whose labels name no model class boxes nothing); pass "
                "--allow_empty to accept an empty run")
    return None


def check_run_folder(path: str, flag: str = "--annotations") -> None:
    """Refuse, in one line, a run folder that does not exist (rather than "no summary.json" about nothing)."""
    from .options import OptionsError

    try:
        exists = FileSystems.exists(path.rstrip("/")) or FileSystems.exists(FileSystems.join(path.rstrip("/"),
                                                                                             "summary.json"))
    except Exception:
        exists = False
    if not exists:
        raise OptionsError(f"{flag} {path} does not exist: expected the --output folder of a `weakloc label` run")


def _files(output: str, prefix: str) -> list[str]:
    pattern = FileSystems.join(output.rstrip("/"), f"{prefix}-*.parquet")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_table(output: str, kind: str = "annotations", *, allow_incomplete: bool = False) -> pa.Table:
    """All rows of `annotations` or `failures` under `output`, as one Arrow table with the declared schema.

    summary.json is written last, so it marks a finished run: without it the Parquet files may be a partial set
    (a run killed while Beam renamed its temp files) and IncompleteRunError is raised unless `allow_incomplete`.
    With it, exactly the files the summary lists (by name, in `output`) are read, so a stray file in the folder
    never joins the table.
    """
    if kind not in ("annotations", "failures"):
        raise ValueError(f"kind must be 'annotations' or 'failures', got {kind!r}")
    paths = _files(output, kind)
    summary_path = FileSystems.join(output.rstrip("/"), "summary.json")
    if FileSystems.exists(summary_path):
        listed = read_summary(output).get("files", {}).get(kind)
        if listed is not None:
            # By name inside `output`: a run copied or moved elsewhere still reads its own files.
            paths = sorted(FileSystems.join(output.rstrip("/"), posixpath.basename(p)) for p in listed)
            missing = [p for p in paths if not FileSystems.exists(p)]
            if missing:
                raise IncompleteRunError(f"{output}: summary.json lists {kind} files that are gone: {missing}")
    elif not allow_incomplete:
        raise IncompleteRunError(
            f"{output} has no summary.json: the run did not finish (or is still finalising), so its "
            f"{kind} files may be incomplete"
        )
    tables = []
    for path in paths:
        with FileSystems.open(path) as f:
            tables.append(pq.read_table(pa.BufferReader(f.read())))
    if not tables:
        return (schema.FAILURE_SCHEMA if kind == "failures" else schema.ANNOTATION_SCHEMA).empty_table()
    return pa.concat_tables(tables, promote_options="none")


# The launcher's annex to a finished run: the runner's metrics, known only once the job is over, so written after
# summary.json (the commit point, never rewritten) and only by a launcher that waited for the job.


def read_summary(output: str) -> dict:
    """summary.json of a run, with the runner's metrics from metrics.json ("metrics", "throughput") when present."""
    root = output.rstrip("/")
    where = FileSystems.join(root, SUMMARY)
    with FileSystems.open(where) as f:
        summary = json.loads(f.read().decode())
    try:
        RunSummary.from_json(summary, where=where)  # the declared document: refuse what is not a run's record
    except SummaryError as exc:
        raise IncompleteRunError(str(exc)) from None
    metrics_path = FileSystems.join(root, METRICS)
    if FileSystems.exists(metrics_path):
        with FileSystems.open(metrics_path) as f:
            summary.update(json.loads(f.read().decode()))
    return summary
