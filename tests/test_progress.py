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
    assert lines and lines[-1].startswith("weakloc: 45 images done, 3 failed, ")
    assert result.queries == 1  # polled once, not on every tick: Dataflow metrics are a service call
