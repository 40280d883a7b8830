"""The same labels whatever runs the pipeline: the local FnApiRunner and its multi-process mode. Beam's portable
path (a job service and EXTERNAL worker pools on other hosts, the route Flink, Spark and Dataflow Runner v2
take) is tested with no shared disk in test_cluster.py: its workers must read everything from object storage.
"""
from __future__ import annotations

import io
import json
import re

import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results

from tests.helpers import RUNNER, assert_same_rows, canonical_rows

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
    assert results.read_summary(out) == summary  # on disk, not only returned
    # summary.json, the commit point, is written once by the pipeline; the runner's metrics come after it.
    with open(f"{out}/summary.json") as f:
        assert "metrics" not in json.load(f)
    with open(f"{out}/metrics.json") as f:
        assert json.load(f) == {"metrics": summary["metrics"], "throughput": summary["throughput"]}


def test_local_run_shows_progress_on_a_terminal(local_run):
    shown = local_run[2]
    final = shown.split("\r")[-1]
    assert final.endswith("\n") and shown.count("\n") == 1  # one line, rewritten in place
    assert re.match(rf"weakloc: {N_GOOD + 1} images done, 1 failed, \d+\.\d images/s, \d+ s\n$", final), final


def _assert_same_output(actual: str, expected: str):
    want = canonical_rows(expected)
    assert_same_rows(canonical_rows(actual), want)
    assert sum(len(r["boxes"]) for r in want[0].values()) >= N_GOOD  # the comparison covered real boxes


@pytest.mark.slow
def test_multi_processing_workers_match_local(shards, tiny_model_path, reference, tmp_path):
    out = tmp_path / "multi"
    summary = _label(shards, tiny_model_path, out, f"--runner={RUNNER}", "--direct_num_workers=2",
                     "--direct_running_mode=multi_processing")
    assert summary["counts"]["read"] == N_GOOD + 1 and summary["counts"]["balanced"]
    _assert_metrics(summary)
    _assert_same_output(str(out), reference)
