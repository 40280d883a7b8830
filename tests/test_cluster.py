"""A cluster with no shared disk on one machine: Beam's job service and two EXTERNAL worker pools, each on its own
"host" (a network namespace joined to a bridge, with its own mounts, HOME, TMPDIR and empty working directory,
the launcher's test files hidden under an empty tmpfs), and an S3 server (moto's) as the only shared storage.

This is the portable path a Flink or Spark job server drives (README, "Flink and Spark"). Where namespaces
cannot be made (not root, no iproute2) the same services run as plain processes on 127.0.0.1 with their own
HOME/TMPDIR/working directory, and the test says so in its output.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results
from weakloc.pipeline.options import OptionsError

from tests import cluster_kit
from tests.helpers import RUNNER, assert_same_rows, canonical_rows

N_IMAGES = 2000
SHARDS = 8
N_BAD = 8  # records that are not images: the same failure rows everywhere
# Each SDK worker starts as Beam's container starts it: the job's options from the provision service.
BOOT = os.path.join(os.path.dirname(sys.executable), "weakloc-worker-boot")
ARGS = ["--top_k", "2", "--classes", "both", "--batch_size", "32"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_path):
    """2,000 40x40 shape records (and 8 that are not images) in 8 TFRecord shards, with the model, on local disk."""
    root = tmp_path_factory.mktemp("cluster_inputs")
    (root / "shards").mkdir()
    (root / "model").mkdir()
    data = synthetic.make_shapes(N_IMAGES, size=40, seed=16)
    per = N_IMAGES // SHARDS
    for k in range(SHARDS):
        frames = [records.frame_record(records.make_example(synthetic.encode_png(data.images[i]), source_id=f"i{i}",
                                                            labels=[int(data.labels[i]) % 3]))
                  for i in range(k * per, (k + 1) * per)]
        frames.append(records.frame_record(records.make_example(b"not an image", source_id=f"bad{k}")))
        (root / "shards" / f"part-{k}.tfrecord").write_bytes(b"".join(frames))
    for src in (tiny_model_path, tiny_model_path[: -len(".keras")] + ".json"):
        (root / "model" / os.path.basename(src)).write_bytes(open(src, "rb").read())
    return root


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cluster_reference") / "out")
    label.run(["--input", str(inputs / "shards" / "*.tfrecord"), "--model", str(inputs / "model" / "tiny.keras"),
               "--output", out, *ARGS, f"--runner={RUNNER}"])
    return out, str(inputs)


class Cluster:
    def __init__(self, net, s3, bucket, job_endpoint, dispatcher, pools, logs):
        self.net, self.s3, self.bucket = net, s3, bucket
        self.job_endpoint, self.dispatcher, self.pools, self.logs = job_endpoint, dispatcher, pools, logs

    def beam_flags(self) -> list[str]:
        return ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}", "--environment_type=EXTERNAL",
                f"--environment_config={self.dispatcher.address}",
                # The job service runs Beam's FnApiRunner: this many workers, each stage split between them.
                "--direct_num_workers=2",
                f"--temp_location=s3://{self.bucket}/tmp", *self.s3.beam_flags()]


@pytest.fixture(scope="module")
def cluster(inputs, tmp_path_factory):
    why_not = cluster_kit.namespaces_unavailable()
    logs = tmp_path_factory.mktemp("cluster_logs")
    hide = [str(tmp_path_factory.getbasetemp())]  # everything the launcher's tests wrote
    with contextlib.ExitStack() as stack:
        if why_not and os.environ.get("WEAKLOC_REQUIRE_NETNS"):
            pytest.fail(f"WEAKLOC_REQUIRE_NETNS is set but no network namespace can be made: {why_not}")
        if why_not:
            warnings.warn(f"no network namespaces ({why_not}): job service and worker pools run as separate "
                          "processes on 127.0.0.1 with their own HOME/TMPDIR, sharing this machine's disk", stacklevel=2)
            net = cluster_kit.Loopback(["jobs", "pool1", "pool2"])
        else:
            net = stack.enter_context(cluster_kit.network(["jobs", "pool1", "pool2"]))
        s3 = stack.enter_context(cluster_kit.moto_server(str(logs), host=net.host_ip))
        bucket = s3.make_bucket()
        s3.upload_tree(inputs, f"s3://{bucket}")
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        rng = random.Random(os.getpid())
        job_port = cluster_kit.free_port() if why_not else rng.randrange(20000, 40000)
        jobs_dir = cluster_kit.private_workdir("jobs")
        stack.callback(lambda: subprocess.run(["rm", "-rf", jobs_dir]))
        stack.enter_context(cluster_kit.process(
            net.run_in("jobs", [sys.executable, "-c", cluster_kit.JOB_SERVICE, net.ip["jobs"], str(job_port),
                                os.path.join(jobs_dir, "staging")], workdir=jobs_dir, hide=hide),
            logs / "jobs.log", host=net.ip["jobs"], port=job_port, env=env))
        pools = {}
        for name in ("pool1", "pool2"):
            port = cluster_kit.free_port() if why_not else rng.randrange(20000, 40000)
            workdir = cluster_kit.private_workdir(name)
            stack.callback(lambda d=workdir: subprocess.run(["rm", "-rf", d]))
            pools[name] = stack.enter_context(cluster_kit.process(
                net.run_in(name, [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                                  f"--service_port={port}", f"--container_executable={BOOT}"],
                           workdir=workdir, hide=hide),
                logs / f"{name}.log", host=net.ip[name], port=port, env=env))
            pools[name].address = f"{net.ip[name]}:{port}"
        dispatcher = stack.enter_context(cluster_kit.PoolDispatcher([p.address for p in pools.values()],
                                                                    net.host_ip))
        yield Cluster(net, s3, bucket, f"{net.ip['jobs']}:{job_port}", dispatcher, pools, logs)


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


def _argv(cluster, out):
    root = f"s3://{cluster.bucket}"
    return ["--input", f"{root}/shards/*.tfrecord", "--model", f"{root}/model/tiny.keras", "--output", out, *ARGS,
            *cluster.beam_flags()]


@pytest.mark.slow
def test_two_worker_pools_on_other_hosts_label_2000_images_as_the_local_run(cluster, reference):
    out = f"s3://{cluster.bucket}/out/run1"
    summary = _within(600, label.run, _argv(cluster, out))
    counts = summary["counts"]
    assert (counts["read"], counts["annotated"], counts["failed"]) == (N_IMAGES + N_BAD, N_IMAGES, N_BAD)
    assert counts["balanced"] and counts["duplicate_ids"]["ids"] == 0
    # Both pools were asked for workers (the job service started them through the one EXTERNAL address).
    started = {pool: len(ids) for pool, ids in cluster.dispatcher.started.items()}
    assert all(n >= 1 for n in started.values()), started
    # The runner's own counters, gathered from both pools' workers by the job service.
    m = summary["metrics"]
    assert (m["records_read"], m["images_decoded"], m["decode_failures"]) == (N_IMAGES + N_BAD, N_IMAGES, N_BAD)
    assert (m["num_inferences"], m["annotations_written"], m["failures_written"]) == (N_IMAGES, N_IMAGES, N_BAD)
    ref_out, ref_root = reference
    assert_same_rows(canonical_rows(out, f"s3://{cluster.bucket}"), canonical_rows(ref_out, ref_root))


def _sdk_workers(pool: subprocess.Popen) -> list[int]:
    """Pids of the SDK worker processes a worker pool started (children of its process)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"sdk_worker_main" in cmd and _descends(ppid, pool.pid):
            found.append(int(pid))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(10):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, reference):
    """SIGKILL one SDK worker once the job has started writing rows. Beam's portable runner does not retry a
    bundle whose worker died, so the job fails: with a clear message, and with no output a reader would take for
    a finished run. The same command with --overwrite then labels every input exactly once."""
    out = f"s3://{cluster.bucket}/out/killed"
    killed = []

    def kill_when_writing():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            writing = any("beam-temp" in k for k in cluster.s3.keys(f"s3://{cluster.bucket}/out/killed"))
            victims = _sdk_workers(cluster.pools["pool2"]) or _sdk_workers(cluster.pools["pool1"])
            if writing and victims:
                os.kill(victims[0], signal.SIGKILL)
                killed.append(victims[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_writing, daemon=True)
    killer.start()
    try:
        summary = _within(600, label.run, _argv(cluster, out))
        outcome = "completed"
    except Exception as exc:  # the job failed: say how, check what it left
        summary, outcome = None, f"{type(exc).__name__}: {exc}"
    killer.join(5)
    print(f"worker {killed} SIGKILLed; the job: {outcome.splitlines()[0][:300]}")
    assert killed, "no SDK worker was running while rows were written"
    ref_out, ref_root = reference
    if summary is not None:
        # Completed despite the kill: every input exactly once.
        c = summary["counts"]
        assert c["balanced"] and c["duplicate_ids"]["ids"] == 0 and c["read"] == N_IMAGES + N_BAD
        assert_same_rows(canonical_rows(out, f"s3://{cluster.bucket}"), canonical_rows(ref_out, ref_root))
        return
    # Either the job service reports the job FAILED, or it stops answering (DEADLINE_EXCEEDED while it waits on
    # the dead worker), which label.run turns into JobLostError; both must say the job did not finish.
    assert "FAILED" in outcome or "failed" in outcome or ("JobLostError" in outcome and "did not finish" in outcome), \
        outcome
    assert not [k for k in cluster.s3.keys(f"s3://{cluster.bucket}/out/killed/") if k.endswith("summary.json")]
    with pytest.raises(results.IncompleteRunError):
        results.read_table(out)
    summary = _within(600, label.run, [*_argv(cluster, out), "--overwrite"])
    c = summary["counts"]
    assert c["balanced"] and c["duplicate_ids"]["ids"] == 0 and c["annotated"] == N_IMAGES
    assert_same_rows(canonical_rows(out, f"s3://{cluster.bucket}"), canonical_rows(ref_out, ref_root))


@pytest.mark.parametrize("runner", [
    ["--runner=PortableRunner", "--job_endpoint=localhost:1", "--environment_type=EXTERNAL",
     "--environment_config=localhost:2"],
    ["--runner=PortableRunner", "--job_endpoint=localhost:1"],  # default environment: DOCKER
    ["--runner=FlinkRunner", "--flink_master=localhost:8081"],
    ["--runner=SparkRunner", "--spark_master_url=spark://localhost:7077"],
    ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"],
])
def test_local_paths_are_refused_at_launch_for_every_remote_runner(runner, inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OptionsError, match="workers cannot read local paths"):
        label.prepare(["--input", str(inputs / "shards" / "*.tfrecord"), "--model",
                       str(inputs / "model" / "tiny.keras"), "--output", str(out), *runner])
    assert not out.exists()


def test_loopback_portable_runner_may_read_local_paths(inputs, tmp_path):
    """LOOPBACK runs the SDK worker inside the launcher, which does see its own files."""
    label.prepare(["--input", str(inputs / "shards" / "*.tfrecord"), "--model", str(inputs / "model" / "tiny.keras"),
                   "--output", str(tmp_path / "out"), "--runner=PortableRunner", "--job_endpoint=localhost:1",
                   "--environment_type=LOOPBACK"])
