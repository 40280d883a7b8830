"""The nightly flow with no local disk: inputs, model, temp files and outputs on s3://, served by a real S3 HTTP
server (moto's) on 127.0.0.1 and reached through Beam's own S3 filesystem and its --s3_* options. Every result
is compared with the same flow on local disk. Also: an S3 that fails 5% of requests, and the commit point.
"""
from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys

import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import evaluate, export, label, results
from weakloc.pipeline.options import OptionsError

from tests import cluster_kit
from tests.helpers import RUNNER

NAMES = ("cat", "dog", "bird")


def _shard(path, ids, seed, *, bad=()):
    """TFRecord shard of 40x40 shapes with an image label and the true box; ids in `bad` hold no image."""
    data = synthetic.make_shapes(len(ids), size=40, seed=seed)
    frames = []
    for i, image_id in enumerate(ids):
        payload = b"not an image" if image_id in bad else synthetic.encode_png(data.images[i])
        x0, y0, x1, y1 = (float(v) / 40 for v in data.boxes[i])
        frames.append(records.frame_record(records.make_example(
            payload, source_id=image_id, labels=[i % 3], label_texts=[NAMES[i % 3]], boxes=[[x0, y0, x1, y1]],
            box_labels=[i % 3], box_texts=[NAMES[i % 3]])))
    path.write_bytes(b"".join(frames))


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_model_path):
    """Local files of two nights (night 2 adds a shard and re-sends one id), image folders and the model."""
    root = tmp_path_factory.mktemp("nightly_tree")
    (root / "shards").mkdir()
    _shard(root / "shards" / "night1-a.tfrecord", [f"a{i}" for i in range(6)], 1, bad={"a5"})
    _shard(root / "shards" / "night1-b.tfrecord", [f"b{i}" for i in range(5)], 2)
    _shard(root / "shards" / "night2-c.tfrecord", ["c0", "c1", "a2"], 3)
    data = synthetic.make_shapes(6, size=40, seed=4)
    for i, img in enumerate(data.images):
        folder = root / "images" / NAMES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(synthetic.encode_png(img))
    (root / "model").mkdir()
    for src in (tiny_model_path, tiny_model_path[: -len(".keras")] + ".json"):
        (root / "model" / os.path.basename(src)).write_bytes(open(src, "rb").read())
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with cluster_kit.moto_server(str(tmp_path_factory.mktemp("moto_logs"))) as server:
        yield server


@pytest.fixture(scope="module")
def bucket(s3, tree):
    name = s3.make_bucket()
    s3.upload_tree(tree, f"s3://{name}")
    return name


ARGS = ["--top_k", "2", "--classes", "both", "--batch_size", "4"]


def _nightly(root: str, model: str, beam: list[str]) -> dict:
    """Night 1, night 2 with --skip_labeled, an image-folder run, export and evaluate; all paths under `root`."""
    j = posixpath.join
    out = {k: j(root, "out", k) for k in ("night1", "night2", "images", "coco", "eval.json")}
    common = ["--model", model, *ARGS, *beam]
    s1 = label.run(["--input", j(root, "shards", "night1-*.tfrecord"), "--output", out["night1"], *common])
    s2 = label.run(["--input", j(root, "shards", "night*.tfrecord"), "--output", out["night2"], "--skip_labeled",
                    out["night1"], *common])
    s3 = label.run(["--input", j(root, "images", "*", "*.png"), "--output", out["images"], *common])
    e = export.run(["--annotations", out["night2"], "--format", "coco", "--output", out["coco"], *beam])
    ev = evaluate.run(["--annotations", out["night1"], "--output", out["eval.json"], *beam])
    return {"summaries": (s1, s2, s3), "export": e, "evaluate": ev, "out": out}


def _rows(output: str, root: str):
    """Annotation and failure rows with `root` taken off every path, box lists sorted: comparable across disks."""
    def strip(v):
        return v.replace(root.rstrip("/") + "/", "") if isinstance(v, str) else v

    ann = []
    for r in results.read_table(output).to_pylist():
        r = {k: strip(v) for k, v in r.items()}
        r["boxes"] = sorted(r["boxes"], key=lambda b: (b["class_id"], b["xmin"], b["ymin"]))
        ann.append(r)
    fail = [{k: strip(v) for k, v in r.items()} for r in results.read_table(output, "failures").to_pylist()]
    return sorted(ann, key=lambda r: r["image_id"]), sorted(fail, key=lambda r: r["source"])


@pytest.fixture(scope="module")
def local_flow(tree, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("local_flow"))
    for sub in ("shards", "images", "model"):
        os.symlink(tree / sub, os.path.join(root, sub))
    return _nightly(root, os.path.join(root, "model", "tiny.keras"), [f"--runner={RUNNER}"]), root


@pytest.mark.slow
def test_the_nightly_flow_on_s3_equals_local_disk(s3, bucket, local_flow):
    local, local_root = local_flow
    root = f"s3://{bucket}"
    remote = _nightly(root, f"{root}/model/tiny.keras",
                      [f"--runner={RUNNER}", f"--temp_location={root}/tmp", *s3.beam_flags()])
    # Every output object is in the bucket, with no temp object left beside the tables.
    keys = s3.keys(f"s3://{bucket}/out/")
    assert "out/night1/summary.json" in keys and "out/night2/summary.json" in keys and "out/coco/export.json" in keys
    assert "out/eval.json" in keys and not [k for k in keys if "beam-temp" in k or k.endswith(".tmp")]
    for kind in ("night1", "night2", "images"):
        assert _rows(remote["out"][kind], root) == _rows(local["out"][kind], local_root), kind
    r1, r2, r3 = remote["summaries"]
    # Night 1: 11 records (one not an image); night 2 skips night 1's 10 annotated ids, retries the bad one.
    assert (r1["counts"]["read"], r1["counts"]["annotated"], r1["counts"]["failed"]) == (11, 10, 1)
    assert (r2["counts"]["annotated"], r2["counts"]["failed"], r2["counts"]["skipped_labeled"]) == (2, 1, 11)
    assert r2["skip_labeled"][0]["output"] == remote["out"]["night1"] and r2["skip_labeled"][0]["same_model"]
    assert r3["counts"]["annotated"] == 6 and r3["options"]["folder_labels"]
    for rs, ls in zip(remote["summaries"], local["summaries"]):
        assert rs["counts"] == ls["counts"] and rs["model"]["sha256_16"] == ls["model"]["sha256_16"]
    assert remote["export"]["counts"] == local["export"]["counts"] and remote["export"]["files"]
    local_coco_files = sorted(os.listdir(local["out"]["coco"]))
    assert sorted(k[len("out/coco/"):] for k in keys if k.startswith("out/coco/")) == local_coco_files
    for name in ("instances.json", "results.json", "ground_truth.json"):  # the same documents, paths aside
        remote_text = s3.client().get_object(Bucket=bucket, Key=f"out/coco/{name}")["Body"].read().decode()
        with open(os.path.join(local["out"]["coco"], name)) as f:
            local_text = f.read()
        assert json.loads(remote_text.replace(root + "/", "")) == json.loads(local_text.replace(local_root + "/", ""))
    for key in ("per_class", "rows", "rows_without_ground_truth"):
        assert remote["evaluate"][key] == local["evaluate"][key], key
    assert remote["evaluate"]["rows"] == 10


def test_an_s3_flag_reaches_launch_time_checks(s3, bucket, tmp_path):
    """The launcher validates s3:// inputs with the job's --s3_* options: a missing pattern is refused at once."""
    with pytest.raises(OptionsError, match="matches no file"):
        label.prepare(["--input", f"s3://{bucket}/shards/nothing-*.tfrecord", "--model",
                       f"s3://{bucket}/model/tiny.keras", "--output", f"s3://{bucket}/never", f"--runner={RUNNER}",
                       *s3.beam_flags()])
    assert s3.keys(f"s3://{bucket}/never") == []


@pytest.mark.slow
def test_five_percent_of_s3_requests_failing_change_nothing(s3, bucket, local_flow):
    """A loopback proxy answers a seeded 5% of S3 requests with 503 SlowDown: botocore retries, rows identical."""
    local, local_root = local_flow
    root = f"s3://{bucket}"
    with cluster_kit.faulty_proxy(s3.endpoint, 0.05, seed=16) as proxy:
        out = f"{root}/faulty/night1"
        summary = label.run(["--input", f"{root}/shards/night1-*.tfrecord", "--model", f"{root}/model/tiny.keras",
                             "--output", out, *ARGS, f"--runner={RUNNER}", f"--temp_location={root}/faulty-tmp",
                             *s3.beam_flags(proxy.endpoint)])
        # The check reads through the same faults.
        got = _rows(out, root)
    print(f"S3 faults: {proxy.injected} of {proxy.requests} requests answered 503")
    assert proxy.injected >= 3 and proxy.requests >= 60, (proxy.injected, proxy.requests)
    assert got == _rows(local["out"]["night1"], local_root)
    assert summary["counts"]["balanced"] and summary["counts"]["read"] == 11


def test_summary_json_is_published_once_in_one_step(s3, bucket, tmp_path, monkeypatch):
    """On s3:// the summary is one PUT of the whole document (no temp object, no rename); on local disk it is
    moved into place whole (os.replace), and an earlier one is replaced in that same step."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from weakloc.transforms import write

    FileSystems.set_options(PipelineOptions(s3.beam_flags()))
    calls = []
    real_rename, real_delete = FileSystems.rename, FileSystems.delete
    monkeypatch.setattr(FileSystems, "rename", staticmethod(lambda *a: calls.append(("rename", a)) or real_rename(*a)))
    monkeypatch.setattr(FileSystems, "delete", staticmethod(lambda *a: calls.append(("delete", a)) or real_delete(*a)))
    path = f"s3://{bucket}/publish/summary.json"
    write.publish_json(path, {"run": 1})
    write.publish_json(path, {"run": 2})
    assert calls == [] and s3.keys(f"s3://{bucket}/publish/") == ["publish/summary.json"]
    assert json.loads(s3.client().get_object(Bucket=bucket, Key="publish/summary.json")["Body"].read()) == {"run": 2}

    local = tmp_path / "summary.json"
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((a, b)) or real_replace(a, b))
    write.publish_json(str(local), {"run": 1})
    write.publish_json(str(local), {"run": 2})
    assert calls == [] and [b for _, b in replaced] == [str(local)] * 2
    assert json.loads(local.read_text()) == {"run": 2} and os.listdir(tmp_path) == ["summary.json"]


_KILL_ON_RENAME = """
import os, signal, sys
from apache_beam.io.filesystems import FileSystems
real = FileSystems.rename
def rename(sources, destinations, *a, **k):
    # Let the first table's renames through, then die (SIGKILL: no cleanup) before the second table's.
    if any("failures-" in d for d in destinations):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(sources, destinations, *a, **k)
FileSystems.rename = staticmethod(rename)
from weakloc.pipeline import label
label.run(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_launcher_killed_during_the_final_renames_leaves_no_finished_run(s3, bucket, tmp_path):
    """SIGKILL as the launcher renames the failure table into place on s3:// (after the annotation table's; an
    object store's rename is a copy and a delete per file): no reader takes the output for a finished run, the
    same --output is refused with the reason, and --overwrite labels it all. The code path is the same on disk."""
    root = f"s3://{bucket}"
    out = f"s3://{bucket}/killed/{tmp_path.name}"
    argv = ["--input", f"{root}/shards/night1-*.tfrecord", "--model", f"{root}/model/tiny.keras", "--output", out,
            *ARGS, f"--runner={RUNNER}", *s3.beam_flags()]
    done = subprocess.run([sys.executable, "-c", _KILL_ON_RENAME, *argv], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions(s3.beam_flags()))
    listed = [m.path for m in FileSystems.match([f"{out}/*"])[0].metadata_list]
    names = {posixpath.basename(p) for p in listed}
    assert any(n.startswith("annotations-") for n in names)  # the kill came after the first table's renames
    assert "summary.json" not in names and not any(n.startswith("failures-") for n in names)
    with pytest.raises(results.IncompleteRunError, match="no summary.json"):
        results.read_table(out)
    with pytest.raises(OptionsError, match="did not finish"):
        label.prepare(argv)
    summary = label.run([*argv, "--overwrite"])
    assert (summary["counts"]["annotated"], summary["counts"]["failed"]) == (10, 1)
    assert len(results.read_table(out)) == 10
