"""Accounting: overlapping patterns count a file once, inference failures become well-formed rows, the summary's
balance is checked against an independent count, and a model replaced mid-run is refused on the worker."""
import dataclasses
import hashlib

import pytest

from weakloc.models.annotate import ImageMeta
from weakloc.models.opening import ModelSpec
from weakloc.models.sidecar import Preprocessing
from weakloc.pipeline import label, results
from weakloc.transforms import inference
from weakloc.transforms.decode import DecodedInput
from tests.helpers import RUNNER


TINY_PREP = Preprocessing((32, 32), 1 / 255, 0.0, ("cat", "dog", "bird"))


def test_overlapping_patterns_label_each_file_once(folder_tree, tiny_model_path, tmp_path):  # noqa: F811
    root, truth = folder_tree
    out = tmp_path / "out"
    summary = label.run(["--input", str(root / "*" / "*.png"), "--input", str(root / "cat" / "*.png"),
                         "--labels_from_folder", "yes", "--model", tiny_model_path, "--output", str(out),
                         f"--runner={RUNNER}"])
    assert summary["counts"]["read"] == summary["counts"]["annotated"] == len(truth)
    assert summary["counts"]["balanced"] is True
    assert len(results.read_table(str(out))) == len(truth)


def test_failed_batch_becomes_one_row_per_image_with_class_and_message():
    metas = [ImageMeta(image_id=f"id{i}", source=f"s{i}", width=4, height=4) for i in range(2)]
    batch = [DecodedInput(meta=m, pixels=None) for m in metas]
    exc = MemoryError("OOM on batch")
    # Beam's dead letter: (batch, (type, repr, formatted traceback)).
    rows = list(label._failed_batch_rows((batch, (type(exc), repr(exc), ["Traceback ..."]))))
    assert [(r["source"], r["image_id"], r["stage"], r["error"]) for r in rows] == [
        ("s0", "id0", "inference", "MemoryError"), ("s1", "id1", "inference", "MemoryError")]
    assert "OOM on batch" in rows[0]["message"]


def test_worker_refuses_a_model_that_changed_since_launch(tiny_model_path):
    spec = ModelSpec(path=tiny_model_path, name="tiny", prep=TINY_PREP, fingerprint="0" * 16)
    with pytest.raises(RuntimeError, match="changed since the job started"):
        inference.load_cam_model(spec, top_k=1)
    with open(tiny_model_path, "rb") as f:
        good = dataclasses.replace(spec, fingerprint=hashlib.sha256(f.read()).hexdigest()[:16])
    assert inference.load_cam_model(good, top_k=1).num_classes == 3


def test_dataflow_refuses_local_paths_before_launch(tiny_model_path, tmp_path):
    from weakloc.pipeline.options import OptionsError

    shard = tmp_path / "a.tfrecord"
    shard.write_bytes(b"")
    with pytest.raises(OptionsError, match="DataflowRunner workers cannot read local paths"):
        label.run(["--input", str(shard), "--model", tiny_model_path, "--output", str(tmp_path / "out"),
                   "--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"])
    assert not (tmp_path / "out").exists()


def test_image_file_over_byte_limit_is_refused_unread(folder_tree, tiny_model_path, tmp_path):  # noqa: F811
    root, truth = folder_tree
    sizes = {p: __import__("os").path.getsize(p) for p in truth}
    limit = sorted(sizes.values())[len(sizes) // 2]  # about half the files are larger
    out = tmp_path / "out"
    summary = label.run(["--input", str(root / "*" / "*.png"), "--model", tiny_model_path, "--output", str(out),
                         "--max_file_bytes", str(limit), f"--runner={RUNNER}"])
    failures = results.read_table(str(out), "failures").to_pylist()
    too_big = {p for p, n in sizes.items() if n > limit}
    assert too_big and {f["source"] for f in failures} == too_big
    assert {f["error"] for f in failures} == {"FileTooLarge"} and {f["stage"] for f in failures} == {"read"}
    assert summary["counts"]["read"] == len(truth) and summary["counts"]["balanced"] is True


def test_reading_a_run_without_summary_is_refused(folder_tree, tiny_model_path, tmp_path):  # noqa: F811
    root, truth = folder_tree
    out = tmp_path / "out"
    label.run(["--input", str(root / "*" / "*.png"), "--model", tiny_model_path, "--output", str(out),
               f"--runner={RUNNER}"])
    # A stray copy in the folder is not part of the run: the summary's file list decides.
    first = sorted(out.glob("annotations-*.parquet"))[0]
    (out / "annotations-99999-of-99999.parquet").write_bytes(first.read_bytes())
    assert len(results.read_table(str(out))) == len(truth)
    (out / "summary.json").unlink()  # as after a kill during the final renames
    with pytest.raises(results.IncompleteRunError, match="no summary.json"):
        results.read_table(str(out))
    assert len(results.read_table(str(out), allow_incomplete=True)) == 2 * len(truth)


def test_a_worker_in_the_launching_process_takes_the_model_validated_at_launch(tiny_model_path, monkeypatch):
    from weakloc.models import opening

    with open(tiny_model_path, "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
    spec = ModelSpec(path=tiny_model_path, name="tiny", prep=TINY_PREP, fingerprint=fingerprint)
    validated = spec.open(top_k=1)
    inference.remember_model(spec, validated)
    loads = []
    real_load = opening.load_keras_model
    monkeypatch.setattr(opening, "load_keras_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert inference.load_cam_model(spec, top_k=1) is validated and loads == []
    # Without a content hash to vouch for the file, for other contents or another top_k, the worker loads the
    # file itself.
    for other, k in (({"fingerprint": ""}, 1), ({"safe_mode": False}, 1), ({}, 2)):
        assert inference.load_cam_model(dataclasses.replace(spec, **other), top_k=k) is not validated
    assert len(loads) == 3
    inference.forget_model()


def test_the_launcher_holds_the_validated_model_only_while_its_own_process_runs_the_job(
        folder_tree, tiny_model_path, tmp_path):  # noqa: F811
    root, _ = folder_tree
    args = ["--input", str(root / "*" / "*.png"), "--labels_from_folder", "yes", "--model", tiny_model_path,
            "--output", str(tmp_path / "out"), "--engine", "tensorflow"]
    label.prepare([*args, f"--runner={RUNNER}"])
    assert len(inference._REMEMBERED) == 1
    # A converted graph (--engine openvino) is compiled by the workers: the TensorFlow method is not kept.
    label.prepare([*args[:-2], f"--runner={RUNNER}", "--engine", "openvino"])
    assert inference._REMEMBERED == []
    # Workers in other processes load the file themselves: nothing to keep for them.
    label.prepare([*args, "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert inference._REMEMBERED == []
    label.run([*args, f"--runner={RUNNER}"])
    assert inference._REMEMBERED == [], "the model is let go once the job has run"


def test_a_runner_that_stops_answering_is_a_clear_failure_with_nothing_published(
        folder_tree, tiny_model_path, tmp_path, monkeypatch):
    """A job service that drops its stream (DEADLINE_EXCEEDED, as when a worker dies) ends label.run with
    JobLostError naming the output, after asking the runner to cancel, and leaves no summary.json."""
    import apache_beam as beam
    import grpc

    class Lost(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self):
            return "Stream removed"

    cancelled = []

    class Result:
        def wait_until_finish(self):
            raise Lost()

        def cancel(self):
            cancelled.append(True)

        def metrics(self):
            raise AssertionError("not asked once the job is lost")

    monkeypatch.setattr(beam.Pipeline, "run", lambda self, *a, **k: Result())
    root, _ = folder_tree
    out = tmp_path / "out"
    with pytest.raises(label.JobLostError, match=r"DEADLINE_EXCEEDED: Stream removed.*did not finish.*--overwrite"):
        label.run(["--input", str(root / "*" / "*.png"), "--model", tiny_model_path, "--output", str(out),
                   "--engine", "tensorflow", f"--runner={RUNNER}"])
    assert cancelled == [True]
    assert not (out / "summary.json").exists()
    assert isinstance(label.JobLostError("x"), results.IncompleteRunError)  # the CLI's one-line error, exit 2
