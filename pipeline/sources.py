"""The original image bytes behind annotation rows, re-read from where `weakloc label` found them.

A row's `source` is an image file path, or `<shard>:<record index>` for a TFRecord input. Each shard is read once,
front to back, for all the rows that need it. Any filesystem Beam knows (local, gs://, s3://).
"""
from __future__ import annotations

import collections
import logging
import re
from typing import Iterable, Iterator, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from weakloc.models import records
from weakloc.models.files import open_maybe_gzip

logger = logging.getLogger(__name__)

_RECORD_SOURCE = re.compile(r"^(?P<shard>.+):(?P<index>\d+)$")


def split_source(source: str, _shards: Optional[dict] = None) -> tuple[str, Optional[int]]:
    """`shard:index` -> (shard, index) when the shard exists; an image file path -> (path, None).

    `_shards` caches which prefixes exist, so a million rows cost one lookup per shard, not two per row.
    """
    m = _RECORD_SOURCE.match(source)
    if m:
        shards = {} if _shards is None else _shards
        if m["shard"] not in shards:
            shards[m["shard"]] = _exists(m["shard"])
        if shards[m["shard"]]:
            return m["shard"], int(m["index"])
    return source, None


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception:  # a path no filesystem understands
        return False


def iter_image_bytes(sources: Iterable[str]) -> Iterator[tuple[str, Optional[bytes], Optional[str]]]:
    """Yield (source, encoded image bytes or None, why not) for each distinct source, grouped by shard.

    Never raises for a missing or damaged file: the reason comes back instead, so callers can say which images
    they could not include.
    """
    files, shards = [], collections.defaultdict(dict)  # shard -> {index: source}
    known: dict[str, bool] = {}
    for source in dict.fromkeys(sources):
        path, index = split_source(source, known)
        if index is None:
            files.append(source)
        else:
            shards[path][index] = source
    for path in files:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                yield path, f.read(), None
        except Exception as exc:
            yield path, None, f"cannot read {path}: {type(exc).__name__}: {exc}"
    for shard, wanted in shards.items():
        remaining = dict(wanted)
        try:
            with open_maybe_gzip(shard) as stream:
                for i, (_, payload) in enumerate(records.iter_records(stream)):
                    if i in remaining:
                        source = remaining.pop(i)
                        try:
                            encoded, reason = records.parse_example(payload).encoded, None
                        except records.ExampleError as exc:
                            encoded, reason = None, f"{source}: {exc}"
                        yield source, encoded, reason
                    if not remaining:
                        break
        except Exception as exc:
            reason = f"cannot read {shard}: {type(exc).__name__}: {exc}"
        else:
            reason = f"{shard} has fewer records than the annotations name"
        for source in remaining.values():
            yield source, None, reason
