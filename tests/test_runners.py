"""The same labels whatever runs the pipeline: the local FnApiRunner, its multi-process mode, and Beam's portable
path (a job service and an EXTERNAL worker pool in their own processes, the route Flink, Spark and Dataflow
Runner v2 take). Services listen on loopback only and are always stopped by the test that started them.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results

from tests.helpers import RUNNER

N_GOOD = 10  # records that decode; one more is not an image and must come out as the same failure row everywhere


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner_shards")
    data = synthetic.make_shapes(N_GOOD, size=40, seed=21)
    examples = [records.make_example(synthetic.encode_png(img), source_id=f"img{i}", labels=[i % 3])
                for i, img in enumerate(data.images)]
    examples.append(records.make_example(b"not an image", source_id="broken"))
    # Two shards so a multi-worker runner has something to split.
    for k, part in enumerate((examples[:6], examples[6:])):
        (d / f"part-{k}.tfrecord").write_bytes(b"".join(records.frame_record(e) for e in part))
    return str(d / "*.tfrecord")


def _argv(shards, model, out, *beam_flags):
    return ["--input", shards, "--model", model, "--output", str(out), "--top_k", "2", "--classes", "both",
            "--batch_size", "4", *beam_flags]


def _label(shards, model, out, *beam_flags):
    return label.run(_argv(shards, model, out, *beam_flags))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def local_run(shards, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    shown = _Terminal()
    summary = label.run(_argv(shards, tiny_model_path, out, f"--runner={RUNNER}"), progress_stream=shown)
    assert summary["counts"]["annotated"] == N_GOOD and summary["counts"]["failed"] == 1
    return str(out), summary, shown.getvalue()


@pytest.fixture(scope="module")
def reference(local_run):
    return local_run[0]


def _assert_metrics(summary):
    """The runner's weakloc metrics, against what the inputs hold (N_GOOD pictures and one broken record)."""
    m = summary["metrics"]
    assert m["records_read"] == N_GOOD + 1 and m.get("read_failures", 0) == 0
    assert m["images_decoded"] == N_GOOD and m["decode_failures"] == 1
    assert m["num_inferences"] == N_GOOD and m.get("inference_failures", 0) == 0
    assert m["annotations_written"] == N_GOOD and m["failures_written"] == 1
    assert m["boxes_written"] == summary["counts"]["boxes"] >= N_GOOD
    sizes = m["inference_request_batch_size"]
    assert sizes["sum"] == N_GOOD and sizes["max"] <= 4 and sizes["count"] >= 3  # --batch_size 4
    assert m["inference_batch_latency_micro_secs"]["count"] == sizes["count"]
    assert m["inference_batch_latency_micro_secs"]["min"] > 0
    # Every batch's end is stamped, on every runner, and the steady rate counts the images after the first batch.
    assert m["batch_done_ms"]["count"] == sizes["count"] and m["batch_done_ms"]["max"] > m["batch_done_ms"]["min"]
    rate = summary["throughput"]
    assert rate["steady_images"] == N_GOOD - sizes["max"] and rate["steady_images_per_s"] > 0
    assert rate["steady_s"] == (m["batch_done_ms"]["max"] - m["batch_done_ms"]["min"]) / 1000


def test_local_run_summary_repeats_the_metrics(local_run):
    out, summary, _ = local_run
    _assert_metrics(summary)
    assert results.read_summary(out) == summary  # written back to summary.json, not only returned


def test_local_run_shows_progress_on_a_terminal(local_run):
    shown = local_run[2]
    final = shown.split("\r")[-1]
    assert final.endswith("\n") and shown.count("\n") == 1  # one line, rewritten in place
    assert re.match(rf"weakloc: {N_GOOD + 1} images done, 1 failed, \d+\.\d images/s, \d+ s\n$", final), final


def _canonical(output: str):
    """Annotation and failure rows keyed by image, box lists sorted: what must not depend on the runner."""
    rows = {}
    for r in results.read_table(output).to_pylist():
        r["boxes"] = sorted(r["boxes"], key=lambda b: (b["class_id"], b["xmin"], b["ymin"]))
        rows[r["image_id"]] = r
    fails = sorted((f["source"], f["image_id"], f["stage"], f["error"]) for f in results.read_table(output, "failures")
                   .to_pylist())
    return rows, fails


def _assert_same_output(actual: str, expected: str):
    got, got_fail = _canonical(actual)
    want, want_fail = _canonical(expected)
    assert got_fail == want_fail
    assert sorted(got) == sorted(want)
    for image_id, row in want.items():
        other = got[image_id]
        for key in ("source", "width", "height", "labels", "gt_boxes", "model"):
            assert other[key] == row[key], (image_id, key)
        for key in ("classes", "boxes"):
            assert len(other[key]) == len(row[key]), (image_id, key)
            for a, b in zip(other[key], row[key]):
                assert a.keys() == b.keys()
                for field, value in b.items():
                    if isinstance(value, float):
                        assert math.isclose(a[field], value, rel_tol=1e-4, abs_tol=1e-3), (image_id, key, field)
                    else:
                        assert a[field] == value, (image_id, key, field)
    assert sum(len(r["boxes"]) for r in want.values()) >= N_GOOD  # the comparison covered real boxes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _service(module: str, port: int, log_path, *args: str, timeout: float = 90.0):
    """Run `python -m module` in its own process group until the block ends; wait until `port` accepts."""
    log = open(log_path, "wb")
    # The worker pool starts SDK workers as plain `python`: make that this interpreter (the venv with weakloc).
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {proc.returncode}: {open(log_path).read()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not listen on {port} within {timeout:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        # The worker pool forks SDK workers: stop the whole group this test started, then make sure.
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _within(seconds, fn, *args):
    """fn(*args) in a daemon thread; fail the test if it has not returned after `seconds`."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the test thread below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the pipeline did not finish within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.slow
def test_portable_runner_with_external_worker_pool_matches_local(shards, tiny_model_path, reference, tmp_path):
    job_port, pool_port = _free_port(), _free_port()
    with _service("apache_beam.runners.worker.worker_pool_main", pool_port, tmp_path / "pool.log",
                  f"--service_port={pool_port}") as pool, \
            _service("apache_beam.runners.portability.local_job_service_main", job_port, tmp_path / "job.log",
                     f"--port={job_port}") as job:
        out = tmp_path / "portable"
        # A job whose workers never come hangs in wait_until_finish: bound it here, and let the services'
        # shutdown end the waiting thread.
        summary = _within(240, _label, shards, tiny_model_path, out, "--runner=PortableRunner",
                          f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
                          f"--environment_config=localhost:{pool_port}")
        assert pool.poll() is None and job.poll() is None
    assert pool.returncode is not None and job.returncode is not None  # both stopped
    assert summary["counts"]["read"] == N_GOOD + 1 and summary["counts"]["balanced"]
    _assert_metrics(summary)
    _assert_same_output(str(out), reference)


@pytest.mark.slow
def test_multi_processing_workers_match_local(shards, tiny_model_path, reference, tmp_path):
    out = tmp_path / "multi"
    summary = _label(shards, tiny_model_path, out, f"--runner={RUNNER}", "--direct_num_workers=2",
                     "--direct_running_mode=multi_processing")
    assert summary["counts"]["read"] == N_GOOD + 1 and summary["counts"]["balanced"]
    _assert_metrics(summary)
    _assert_same_output(str(out), reference)
