"""What the launcher shows while a job runs, and the job's Beam metrics once it is over.

A live line on standard error (rewritten in place with \\r on a terminal, a log line every `interval` seconds
otherwise): images done, images per second, failures. It reads the in-process tally on the local runner and the
runner's metrics (`result.metrics()`) on runners that report them while running (Dataflow does).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Optional, TextIO

from apache_beam.metrics.metric import MetricsFilter

from weakloc.transforms import progress as tally
from weakloc.transforms.tags import BATCH_DONE, NAMESPACE

logger = logging.getLogger(__name__)

DONE, FAILED = "annotations_written", "failures_written"
_POLL_SECONDS = 10.0
# Seconds between the progress lines of the loops outside Beam (`counted`): short work stays silent.
COUNTED_INTERVAL = 10.0


def weakloc_metrics(result) -> dict[str, Any]:
    """The job's metrics in the `weakloc` namespace, summed over steps; {} where the runner reports none.

    Counters become integers; distributions (batch size, batch latency, ...) become {count, sum, min, max, mean}.
    Committed values where the runner has them, else attempted ones.
    """
    if hasattr(result, "_job_service") and getattr(result, "_metrics", None) is not None:
        # Beam's portable PipelineResult (Flink, Spark, a job service) keeps its first metrics() answer for good:
        # polled while the job runs, that froze the live line and gave summary.json the counts of the first
        # poll (none, for a job that had not finished a bundle by then). Ask the job service afresh every time.
        result._metrics = None
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception as exc:  # a runner without metrics support
        logger.info("the runner reports no metrics (%s)", exc)
        return {}
    out: dict[str, Any] = {}
    for item in found.get("counters", []):
        value = item.committed if item.committed is not None else item.attempted
        out[item.key.metric.name] = out.get(item.key.metric.name, 0) + int(value or 0)
    dists: dict[str, list[int]] = {}
    for item in found.get("distributions", []):
        value = item.committed if item.committed is not None else item.attempted
        if value is None or not value.count:
            continue
        acc = dists.setdefault(item.key.metric.name, [0, 0, value.min, value.max])
        acc[0] += value.count
        acc[1] += value.sum
        acc[2], acc[3] = min(acc[2], value.min), max(acc[3], value.max)
    for name, (count, total, lo, hi) in dists.items():
        out[name] = {"count": count, "sum": total, "min": lo, "max": hi, "mean": total / count}
    return dict(sorted(out.items()))


def steady_throughput(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rate of a run's steady loop, from its metrics: images finished after the first batch, over the time from
    the first batch's end to the last's.

    Reads two distributions every metrics-reporting runner keeps: `batch_done_ms` (each batch's end, in ms since
    the job was built) and Beam's `inference_request_batch_size`. Start-up (launch checks, model loading, the
    first batch, which traces the compiled function) and finalisation (Parquet files closed, the summary) fall
    outside the window; reading, decoding, inference, boxes and writing rows fall inside. The first batch is taken
    as a full one. With several workers the window runs from the earliest first batch to the latest last one.

    Returns {} with fewer than two batches, else {"first_batch_done_s", "steady_images", "steady_s",
    "steady_images_per_s"}.
    """
    done, sizes = metrics.get(BATCH_DONE), metrics.get("inference_request_batch_size")
    if not isinstance(done, dict) or not isinstance(sizes, dict) or done["count"] < 2 or done["max"] <= done["min"]:
        return {}
    images = sizes["sum"] - sizes["max"]
    seconds = (done["max"] - done["min"]) / 1000.0
    return {"first_batch_done_s": done["min"] / 1000.0, "steady_images": images, "steady_s": seconds,
            "steady_images_per_s": images / seconds}


class Progress:
    """Report images done, images/s and failures until stopped.

    Use as a context manager around the run; `attach(result)` once a runner hands back a result that is still
    running, so its metrics can be polled. Prints a final line when stopped if anything was counted.
    """

    def __init__(self, stream: Optional[TextIO] = None, *, interval: Optional[float] = None,
                 total: Optional[int] = None):
        self.total = total  # inputs to do, where known (image files): the line shows a share and an ETA
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self._base = tally.LOCAL.snapshot()
        self._result = None
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="weakloc-progress", daemon=True)
        self._last = None
        self._polled = -float("inf")
        self._remote: dict[str, Any] = {}

    def attach(self, result) -> None:
        self._result = result

    def counts(self) -> tuple[int, int]:
        """(images done, of which failed) so far: this process's tally, else the attached result's metrics."""
        now = tally.LOCAL.snapshot()
        done = now.get(DONE, 0) - self._base.get(DONE, 0)
        failed = now.get(FAILED, 0) - self._base.get(FAILED, 0)
        if done + failed == 0 and self._result is not None:
            if time.monotonic() - self._polled >= _POLL_SECONDS:  # a service call on Dataflow: not too often
                self._polled = time.monotonic()
                self._remote = weakloc_metrics(self._result)
            done, failed = self._remote.get(DONE, 0), self._remote.get(FAILED, 0)
        return done + failed, failed

    def line(self, done: int, failed: int, elapsed: float) -> str:
        if self.total:
            return f"weakloc: images {eta_text(done, self.total, elapsed)}, {failed} failed, {elapsed:.0f} s"
        rate = done / elapsed if elapsed > 0 else 0.0
        return f"weakloc: {done} images done, {failed} failed, {rate:.1f} images/s, {elapsed:.0f} s"

    def _report(self, final: bool = False) -> None:
        done, failed = self.counts()
        if done == 0 and not final:
            return
        text = self.line(done, failed, time.monotonic() - self._start)
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or (done, failed) != self._last:
            logger.info("%s", text.removeprefix("weakloc: "))
        self._last = (done, failed)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._report()
            except Exception as exc:  # progress must never break a run
                logger.debug("progress report failed: %s", exc)

    def __enter__(self) -> "Progress":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if exc_info[0] is None:
            self._report(final=True)


def eta_text(done: int, total: Optional[int], elapsed: float) -> str:
    """'120/300 (40%), 12.0/s, ETA 15 s' where the total is known, else '120, 12.0/s'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{done}, {rate:.1f}/s"
    eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
    return f"{done}/{total} ({done / total:.0%}), {rate:.1f}/s{eta}"


def counted(items, total: Optional[int], what: str, *, interval: Optional[float] = None):
    """Pass `items` through, logging `what: done/total, rate, ETA` every `interval` seconds (default
    COUNTED_INTERVAL) and once at the end when the loop took that long.

    For the long loops outside Beam (calibrate, evaluate, export, report): the user sees the work move.
    """
    interval = COUNTED_INTERVAL if interval is None else interval
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            last = now
            logger.info("%s: %s", what, eta_text(done, total, now - start))
    if done and time.monotonic() - start >= interval:
        logger.info("%s: %s, done", what, eta_text(done, total, time.monotonic() - start))
