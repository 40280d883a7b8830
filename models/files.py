"""Files on any Beam filesystem (local, gs://, s3://): the one home of weakloc's file helpers.

Beam's `FileSystems` is a filesystem library here, like fsspec, not pipeline code: commands and workers alike
read models, sidecars, thresholds files and shards through these helpers, so every path scheme works everywhere.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import tempfile
from typing import Any, Iterable, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_GZIP_MAGIC = b"\x1f\x8b"


class FileFormatError(ValueError):
    """A file that exists but cannot be read as what it should be (e.g. JSON that does not parse)."""


def file_fingerprint(data: bytes) -> str:
    """Content hash used to name a model in outputs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def local_fingerprint(local_path: str) -> str:
    """`file_fingerprint` of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def fetch_to_local(path: str) -> str:
    """A local file with the bytes of `path` (itself when local); Keras and OpenCV need local files."""
    if os.path.exists(path):
        return path
    # Keep the whole file name: Keras tells formats apart by it (".weights.h5" is not a legacy ".h5").
    suffix = "-" + posixpath.basename(path.rstrip("/"))
    fd, local = tempfile.mkstemp(suffix=suffix, prefix="weakloc-model-")
    with os.fdopen(fd, "wb") as out, FileSystems.open(path) as src:
        while chunk := src.read(1 << 24):
            out.write(chunk)
    return local


def fetch_checked(path: str, fingerprint: str) -> str:
    """A local copy of `path` whose content hash is `fingerprint` ("" skips the check).

    Raises:
      RuntimeError: the file changed since its fingerprint was taken (a retrain mid-run would mislabel rows).
    """
    local = fetch_to_local(path)
    if fingerprint:
        found = local_fingerprint(local)
        if found != fingerprint:
            raise RuntimeError(f"{path} changed since the job started: sha256 {found}, expected {fingerprint}")
    return local


def shard_paths(directory: str, prefix: str, shards: int) -> list[str]:
    """`directory/prefix-00000-of-0000N.tfrecord`, ... (the sharded name Beam and TFDS use)."""
    return [FileSystems.join(directory, f"{prefix}-{s:05d}-of-{shards:05d}.tfrecord") for s in range(shards)]


def write_tfrecord_shards(payloads: Iterable[bytes], paths: Sequence[str]) -> int:
    """Write serialized records round-robin into TFRecord files at `paths` (any Beam filesystem, folders made
    for local paths); returns how many were written. The one TFRecord writer of weakloc."""
    from . import records

    for path in paths:
        if "://" not in path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handles = [FileSystems.create(p) for p in paths]
    count = 0
    try:
        for count, payload in enumerate(payloads, 1):
            handles[(count - 1) % len(handles)].write(records.frame_record(payload))
    finally:
        for h in handles:
            h.close()
    return count


def read_json(path: str, what: str) -> Any:
    """The JSON document at `path`. Raises FileFormatError naming `what` and the path when it does not parse."""
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{what} {path} is not valid JSON: {exc}") from exc


class _GzipStream(gzip.GzipFile):
    """Python's gzip reader over a Beam file, closing both.

    Unlike Beam's CompressedFile it raises EOFError when the stream stops before gzip's end-of-stream marker,
    so a shard cut between two records (a partial copy) is reported instead of being read as complete.
    """

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self):
        try:
            super().close()
        finally:
            self._raw.close()


def open_maybe_gzip(path: str):
    """Open a file for reading, decompressing gzip whether or not its name ends in .gz."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        magic = f.read(2)
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return _GzipStream(raw) if magic == _GZIP_MAGIC else raw
