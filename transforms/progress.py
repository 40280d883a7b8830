"""A process-local tally of finished images, for the launcher's live progress line on the local runner.

Beam metrics are only readable from a pipeline result, which a synchronous runner (FnApiRunner) hands back when
the job is over; its workers run in the launcher's process, so the write step also adds to this tally, which the
launcher polls. Workers in other processes (multi-processing, portable, Dataflow) leave it untouched, and the
launcher falls back to the runner's own metrics where the runner reports them while running.
"""
from __future__ import annotations

import threading


class Tally:
    """Thread-safe counters that only grow; readers take differences between snapshots."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# One per process, like Beam's own metrics containers: written by the write step, read by pipeline/progress.py.
LOCAL = Tally()
