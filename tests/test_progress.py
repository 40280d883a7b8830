"""The launcher's progress reporting on runners whose workers are elsewhere: it polls the result's metrics."""
import io
import logging
import time
import types

from weakloc.pipeline import progress


def _counter(name, committed, attempted=None):
    metric = types.SimpleNamespace(name=name)
    return types.SimpleNamespace(key=types.SimpleNamespace(metric=metric), committed=committed, attempted=attempted)


def _dist(name, count, total, lo, hi):
    value = types.SimpleNamespace(count=count, sum=total, min=lo, max=hi)
    return types.SimpleNamespace(key=types.SimpleNamespace(metric=types.SimpleNamespace(name=name)),
                                 committed=None, attempted=value)


class _RemoteResult:
    """What a Dataflow result answers: weakloc counters from two steps and a distribution from two workers."""

    def __init__(self):
        self.queries = 0

    def metrics(self):
        return self

    def query(self, _filter):
        self.queries += 1
        return {
            "counters": [_counter("annotations_written", 40), _counter("annotations_written", 2),
                         _counter("failures_written", None, attempted=3)],
            "distributions": [_dist("inference_request_batch_size", 2, 40, 8, 32),
                              _dist("inference_request_batch_size", 1, 2, 2, 2)],
        }


def test_metrics_are_summed_over_steps_and_workers():
    m = progress.weakloc_metrics(_RemoteResult())
    assert m["annotations_written"] == 42 and m["failures_written"] == 3  # attempted where nothing committed
    assert m["inference_request_batch_size"] == {"count": 3, "sum": 42, "min": 2, "max": 32, "mean": 14.0}


def test_steady_throughput_spans_the_first_to_the_last_batch():
    # Ten batches of 32 and a short last one of 8; the first ended 4 s after the job was built, the last 14 s.
    metrics = {"batch_done_ms": {"count": 11, "sum": 0, "min": 4000, "max": 14000, "mean": 0.0},
               "inference_request_batch_size": {"count": 11, "sum": 328, "min": 8, "max": 32, "mean": 328 / 11}}
    rate = progress.steady_throughput(metrics)
    assert rate == {"first_batch_done_s": 4.0, "steady_images": 296, "steady_s": 10.0, "steady_images_per_s": 29.6}
    one = {**metrics, "batch_done_ms": {"count": 1, "sum": 4000, "min": 4000, "max": 4000, "mean": 4000.0}}
    assert progress.steady_throughput(one) == {}  # one batch: no loop to time
    assert progress.steady_throughput({}) == {}  # a runner without metrics


def test_a_portable_result_is_asked_afresh_each_time():
    class PortableLike(_RemoteResult):
        """Like Beam's portable PipelineResult: metrics() keeps its first answer in _metrics."""

        def __init__(self):
            super().__init__()
            self._job_service, self._metrics, self.done = object(), None, 0

        def metrics(self):
            if not self._metrics:
                self._metrics = _RemoteResult.metrics(self)
                self._answer = {"counters": [_counter("annotations_written", self.done)], "distributions": []}
            return self._metrics

        def query(self, _filter):
            return self._answer

    result = PortableLike()
    assert progress.weakloc_metrics(result)["annotations_written"] == 0  # polled while nothing was done yet
    result.done = 42
    assert progress.weakloc_metrics(result)["annotations_written"] == 42  # the final query sees the job's end


def test_a_runner_without_metrics_gives_none():
    class NoMetrics:
        def metrics(self):
            raise NotImplementedError("no metrics here")

    assert progress.weakloc_metrics(NoMetrics()) == {}


def test_remote_progress_is_logged_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="weakloc.pipeline.progress")
    result = _RemoteResult()
    with progress.Progress(io.StringIO(), interval=0.01) as shown:
        shown.attach(result)
        time.sleep(0.2)  # about 20 ticks
    lines = [r.getMessage() for r in caplog.records]
    # logged without the "weakloc: " prefix, which the CLI's log format adds to every weakloc message
    assert lines and lines[-1].startswith("45 images done, 3 failed, ")
    assert result.queries == 1  # polled once, not on every tick: Dataflow metrics are a service call


def test_counted_passes_items_through_and_logs_total_rate_and_eta(monkeypatch, caplog):
    """A clock that moves 2 s per item: after item 1 of 4, 0.5/s and 3 items left, so ETA 6 s."""
    ticks = iter(range(0, 100, 2))
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(ticks)))
    with caplog.at_level(logging.INFO, logger="weakloc.pipeline.progress"):
        assert list(progress.counted("abcd", 4, "things", interval=1.0)) == list("abcd")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "things: 1/4 (25%), 0.5/s, ETA 6 s"
    assert lines[-1].startswith("things: 4/4 (100%)") and lines[-1].endswith(", done")
    assert progress.eta_text(30, None, 10.0) == "30, 3.0/s"  # an unknown total: no share, no ETA


def test_short_loops_stay_silent(caplog):
    with caplog.at_level(logging.INFO, logger="weakloc.pipeline.progress"):
        assert sum(progress.counted(range(5), 5, "quick")) == 10
    assert not caplog.records


def test_label_progress_line_shows_total_share_and_eta_where_the_size_is_known():
    # 120 of 300 in 10 s: 12/s, 180 left, so 15 s to go
    known = progress.Progress(io.StringIO(), total=300)
    assert known.line(120, 2, 10.0) == "weakloc: images 120/300 (40%), 12.0/s, ETA 15 s, 2 failed, 10 s"
    unknown = progress.Progress(io.StringIO())  # TFRecords: records are not counted before the run
    assert unknown.line(120, 2, 10.0) == "weakloc: 120 images done, 2 failed, 12.0 images/s, 10 s"
