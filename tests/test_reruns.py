"""Reruns and faults: the same inputs give the same annotations (local runner, and two worker processes), a run
killed half-way leaves nothing that looks complete, and input content never chooses a path weakloc writes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results

from tests.helpers import RUNNER

FINAL_GLOBS = ("annotations-*.parquet", "failures-*.parquet", "summary.json")


def run(*argv: str) -> dict:
    return label.run([*argv, f"--runner={RUNNER}"])


def write_shard(path, n, seed, *, bad_every=0, prefix="r"):
    data = synthetic.make_shapes(n, size=40, seed=seed)
    frames = []
    for i in range(n):
        payload = b"not an image" if bad_every and i % bad_every == bad_every - 1 else synthetic.encode_png(
            data.images[i])
        frames.append(records.frame_record(records.make_example(payload, source_id=f"{prefix}{i}",
                                                                label_texts=[("cat", "dog", "bird")[i % 3]])))
    path.write_bytes(b"".join(frames))


def content(output) -> tuple[list, list]:
    """Annotation and failure rows of a run, order aside (sorted by source, which is unique)."""
    ann = sorted(results.read_table(str(output)).to_pylist(), key=lambda r: r["source"])
    fail = sorted(results.read_table(str(output), "failures").to_pylist(), key=lambda r: r["source"])
    return ann, fail


# --------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reruns_give_the_same_annotations_in_one_and_two_processes(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):  # several shards so two workers really split the work
        write_shard(d / f"s{k}.tfrecord", 14, seed=30 + k, bad_every=5, prefix=f"s{k}-")
    argv = ["--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--classes", "both", "--top_k", "2",
            "--emit_cams", "--batch_size", "4"]
    first = run(*argv, "--output", str(tmp_path / "a"))
    run(*argv, "--output", str(tmp_path / "b"))
    label.run([*argv, "--output", str(tmp_path / "c"), f"--runner={RUNNER}", "--direct_num_workers=2",
               "--direct_running_mode=multi_processing"])
    a, b, c = content(tmp_path / "a"), content(tmp_path / "b"), content(tmp_path / "c")
    assert len(a[0]) == first["counts"]["annotated"] == 3 * 14 - 3 * 2 and len(a[1]) == 6
    assert a == b  # same process layout: bit-identical rows
    # Two worker processes batch differently; every value that is not a float is identical, floats agree to
    # float32 round-off (a batch's composition may change the order of a reduction).
    for ra, rc in zip(a[0], c[0], strict=True):
        assert {k: v for k, v in ra.items() if k not in ("classes", "boxes", "cams")} == \
               {k: v for k, v in rc.items() if k not in ("classes", "boxes", "cams")}
        assert [x["class_id"] for x in ra["classes"]] == [x["class_id"] for x in rc["classes"]]
        assert [(x["class_id"], x["label"]) for x in ra["boxes"]] == [(x["class_id"], x["label"]) for x in rc["boxes"]]
        for xa, xc in zip(ra["boxes"], rc["boxes"]):
            np.testing.assert_allclose([xa[k] for k in ("xmin", "ymin", "xmax", "ymax", "score")],
                                       [xc[k] for k in ("xmin", "ymin", "xmax", "ymax", "score")], atol=1e-4)
        for ca, cc in zip(ra["cams"], rc["cams"], strict=True):
            np.testing.assert_allclose(ca["values"], cc["values"], rtol=1e-4, atol=1e-5)
    assert a[1] == c[1]


# --------------------------------------------------------------------------------------------------------------
# A run killed half-way
# --------------------------------------------------------------------------------------------------------------


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_killed_run_leaves_nothing_that_looks_complete(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(4):
        write_shard(d / f"s{k}.tfrecord", 400, seed=40 + k, prefix=f"s{k}-")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "weakloc.pipeline.cli", "label", "--input", str(d / "*.tfrecord"),
           "--model", tiny_model_path, "--output", str(out), f"--runner={RUNNER}", "--batch_size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_with = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            temp = [f for f in (_files_under(out) if out.exists() else []) if f.startswith("beam-temp-")]
            if temp:  # rows are being written: kill now, as an OOM killer or a pre-empted VM would
                killed_with = temp
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_with is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_with, "the run ended (or never started writing) before it could be killed mid-write"
    left = _files_under(out)
    assert left and all(f.startswith("beam-temp-") for f in left), left
    assert not [p for g in FINAL_GLOBS for p in out.glob(g)]
    # The next run is not refused (nothing complete is there) and gives the whole answer.
    summary = run("--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--output", str(out))
    assert summary["counts"]["annotated"] == 1600 and summary["counts"]["balanced"] is True


# --------------------------------------------------------------------------------------------------------------
# Input content never becomes a path
# --------------------------------------------------------------------------------------------------------------


HOSTILE_IDS = ["../../etc/x", "/etc/passwd", "..\\..\\windows\\x", "out/summary.json", "a\x00b", "~/.bashrc",
               "%2e%2e%2fx", "gs://other-bucket/x"]


def test_hostile_ids_and_class_texts_are_data_not_paths(tiny_model_path, tmp_path, monkeypatch):
    sandbox = tmp_path / "sandbox"
    work = sandbox / "deep" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # relative ids such as ../../etc/x would land inside the sandbox
    data = synthetic.make_shapes(len(HOSTILE_IDS), size=40, seed=50)
    shard = sandbox / "in.tfrecord"
    shard.write_bytes(b"".join(
        records.frame_record(records.make_example(
            synthetic.encode_png(data.images[i]), source_id=image_id, filename="../../../tmp/evil.png",
            label_texts=["../../cat"], boxes=[[0.1, 0.1, 0.5, 0.5]], box_texts=["/etc/shadow"]))
        for i, image_id in enumerate(HOSTILE_IDS)))
    before = set(_files_under(tmp_path))
    etc_before = set(os.listdir("/etc"))
    out = sandbox / "out"
    summary = run("--input", str(shard), "--model", tiny_model_path, "--output", str(out))
    new = set(_files_under(tmp_path)) - before
    assert new and all(f.startswith("sandbox/out/") for f in new), sorted(new)
    names = {os.path.basename(f) for f in new}
    assert "summary.json" in names and all(
        n == "summary.json" or (n.startswith(("annotations-", "failures-")) and n.endswith(".parquet"))
        for n in names), names
    assert set(os.listdir("/etc")) == etc_before and not os.path.exists("/etc/x")
    # The ids are kept verbatim as data.
    rows = results.read_table(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(HOSTILE_IDS)
    assert all(r["labels"] == [{"class_id": -1, "label": "../../cat"}] for r in rows)
    assert all(r["gt_boxes"][0]["label"] == "/etc/shadow" for r in rows)
    assert summary["counts"]["duplicate_ids"]["ids"] == 0
