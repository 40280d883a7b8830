"""Reading a run's outputs back (tests, the demo, and later evaluate/export): one table per kind, any filesystem."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from weakloc.models import schema


def _files(output: str, prefix: str) -> list[str]:
    pattern = FileSystems.join(output.rstrip("/"), f"{prefix}-*.parquet")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_table(output: str, kind: str = "annotations") -> pa.Table:
    """All rows of `annotations` or `failures` under `output`, as one Arrow table with the declared schema."""
    if kind not in ("annotations", "failures"):
        raise ValueError(f"kind must be 'annotations' or 'failures', got {kind!r}")
    tables = []
    for path in _files(output, kind):
        with FileSystems.open(path) as f:
            tables.append(pq.read_table(pa.BufferReader(f.read())))
    if not tables:
        return (schema.FAILURE_SCHEMA if kind == "failures" else schema.ANNOTATION_SCHEMA).empty_table()
    return pa.concat_tables(tables, promote_options="none")


def read_summary(output: str) -> dict:
    with FileSystems.open(FileSystems.join(output.rstrip("/"), "summary.json")) as f:
        return json.loads(f.read().decode())
