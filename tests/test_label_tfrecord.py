"""End-to-end `weakloc label` runs on TFRecord shards (local FnApiRunner), read back through `results`.

Each module-scoped fixture runs the pipeline once on small synthetic data and many tests assert on its output.
Expectations come from how the inputs were made (ids, sizes, boxes, labels), never from a previous run.
"""
from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np
import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import results

from tests.helpers import (CLASSES, assert_boxes_inside, by_id, iou,
                           png_bytes, run, sha16, xyxy)


# --------------------------------------------------------------------------------------------------------------
# TFRecord input: a plain and a GZIP shard (both named .tfrecord), non-square images, labels and gt boxes.
# --------------------------------------------------------------------------------------------------------------

W, H = 56, 40  # images are wider than tall, so x/y mix-ups in sizes and gt boxes show
PAD_X = 10  # the 40x40 shape image is pasted at x = PAD_X on a W x H canvas


def _tf_case(i: int, data) -> dict:
    """Spec of record i: the canvas, its true box in pixels, and which optional features it carries."""
    canvas = np.full((H, W, 3), 40, np.uint8)
    canvas[:, PAD_X:PAD_X + 40] = data.images[i]
    x0, y0, x1, y1 = (float(v) for v in data.boxes[i])
    box_px = (x0 + PAD_X, y0, x1 + PAD_X, y1)
    cls = i % 3
    case = {
        "png": png_bytes(canvas),
        "box_px": box_px,
        "source_id": f"photo-{i}" if i % 2 == 0 else None,
        "labels": [cls],
        "label_texts": [CLASSES[cls]],
        "expect_labels": [{"class_id": cls, "label": CLASSES[cls]}],
    }
    if i == 1:  # integer label only: the name comes from the model's classes
        case["label_texts"] = []
    if i == 3:  # a label the model does not know: kept, with class id -1
        case["labels"], case["label_texts"] = [7], ["zebra"]
        case["expect_labels"] = [{"class_id": -1, "label": "zebra"}]
    return case


@pytest.fixture(scope="module")
def tfrecord_run(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("tfrecord_run")
    shards = root / "shards"
    shards.mkdir()
    data = synthetic.make_shapes(8, size=40, seed=3)
    cases = [_tf_case(i, data) for i in range(8)]
    layout = {shards / "a.tfrecord": range(0, 5), shards / "b.tfrecord": range(5, 8)}
    expected = {}  # image_id -> (case, source)
    for path, idxs in layout.items():
        frames = []
        for k, i in enumerate(idxs):
            c = cases[i]
            bx = c["box_px"]
            frames.append(records.frame_record(records.make_example(
                c["png"],
                source_id=c["source_id"],
                labels=c["labels"],
                label_texts=c["label_texts"],
                boxes=[[bx[0] / W, bx[1] / H, bx[2] / W, bx[3] / H]],
                box_labels=[c["labels"][0]],
                box_texts=[c["label_texts"][0]] if c["label_texts"] else [],
            )))
            source = f"{path}:{k}"
            expected[c["source_id"] or source] = (c, source)
        blob = b"".join(frames)
        path.write_bytes(gzip.compress(blob) if path.name == "b.tfrecord" else blob)
    assert (shards / "b.tfrecord").read_bytes()[:2] == b"\x1f\x8b"
    out = root / "out"
    summary = run("--input", str(shards / "*.tfrecord"), "--model", tiny_model_path, "--output", str(out),
                  "--top_k", "2")
    return {
        "out": str(out),
        "summary": summary,
        "expected": expected,
        "rows": by_id(results.read_table(str(out))),
        "failures": results.read_table(str(out), "failures").to_pylist(),
        "model": tiny_model_path,
        "shards": shards,
    }


def test_tfrecord_one_row_per_record_with_ids(tfrecord_run):
    rows, expected = tfrecord_run["rows"], tfrecord_run["expected"]
    assert set(rows) == set(expected)
    assert len(rows) == 8
    for image_id, (case, source) in expected.items():
        assert rows[image_id]["source"] == source
        if case["source_id"] is None:
            assert image_id == source  # '<shard path>:<index>'
    # both shards contributed, the GZIP one included
    assert {e[1].rsplit(":", 1)[0] for e in expected.values()} == {
        str(tfrecord_run["shards"] / "a.tfrecord"), str(tfrecord_run["shards"] / "b.tfrecord")}
    assert tfrecord_run["failures"] == []


def test_tfrecord_sizes_and_boxes_inside(tfrecord_run):
    for row in tfrecord_run["rows"].values():
        assert (row["width"], row["height"]) == (W, H)
        assert len(row["boxes"]) >= 1
        assert_boxes_inside(row)


def test_tfrecord_gt_boxes_in_pixels(tfrecord_run):
    for image_id, (case, _) in tfrecord_run["expected"].items():
        gt = tfrecord_run["rows"][image_id]["gt_boxes"]
        assert len(gt) == 1
        np.testing.assert_allclose(xyxy(gt[0]), case["box_px"], atol=1e-3)
        assert gt[0]["class_id"] == case["expect_labels"][0]["class_id"]


def test_tfrecord_labels(tfrecord_run):
    for image_id, (case, _) in tfrecord_run["expected"].items():
        assert tfrecord_run["rows"][image_id]["labels"] == case["expect_labels"]


def test_tfrecord_top_k_classes(tfrecord_run):
    for row in tfrecord_run["rows"].values():
        classes = row["classes"]
        assert len(classes) == 2
        ids = [c["class_id"] for c in classes]
        assert len(set(ids)) == 2 and all(0 <= c < 3 for c in ids)
        assert [c["label"] for c in classes] == [CLASSES[c] for c in ids]
        assert classes[0]["score"] >= classes[1]["score"]
        assert sum(c["score"] for c in classes) <= 1.0 + 1e-5  # softmax over 3 classes
        # default --classes predicted, min_score 0: one box per predicted class
        assert sorted(b["class_id"] for b in row["boxes"]) == sorted(ids)


def test_tfrecord_model_fingerprint(tfrecord_run):
    fp = sha16(tfrecord_run["model"])
    for row in tfrecord_run["rows"].values():
        assert fp in row["model"]
        assert "tiny.keras" in row["model"]
    assert tfrecord_run["summary"]["model"]["sha256_16"] == fp


def test_tfrecord_summary(tfrecord_run):
    summary = tfrecord_run["summary"]
    assert summary == results.read_summary(tfrecord_run["out"])
    counts = summary["counts"]
    assert counts["read"] == counts["annotated"] + counts["failed"] == 8
    assert counts["annotated"] == 8 and counts["failed"] == 0
    n_boxes = sum(len(r["boxes"]) for r in tfrecord_run["rows"].values())
    assert counts["boxes"] == n_boxes == sum(counts["boxes_per_class"].values())
    assert summary["input_format"] == "tfrecord"
    for f in summary["files"]["annotations"] + summary["files"]["failures"]:
        assert os.path.exists(f)


# --------------------------------------------------------------------------------------------------------------
# Quality with a real trained model: CAM boxes of the true class find the shape.
# --------------------------------------------------------------------------------------------------------------


def test_trained_model_boxes_find_the_shapes(shapes_model, tmp_path):
    model_path, held = shapes_model
    shard = tmp_path / "held.tfrecord"
    with open(shard, "wb") as f:
        for i in range(len(held.labels)):
            f.write(records.frame_record(records.make_example(
                png_bytes(held.images[i]), source_id=f"held-{i}", labels=[int(held.labels[i])])))
    out = tmp_path / "out"
    summary = run("--input", str(shard), "--model", model_path, "--output", str(out),
                  "--classes", "both", "--cam_threshold", "0.5")
    rows = by_id(results.read_table(str(out)))
    n = len(held.labels)
    assert summary["counts"]["annotated"] == n == len(rows)
    correct, hits = 0, 0
    for i in range(n):
        row = rows[f"held-{i}"]
        true = int(held.labels[i])
        correct += row["classes"][0]["class_id"] == true
        true_boxes = [b for b in row["boxes"] if b["class_id"] == true]
        assert len(true_boxes) == 1  # --classes both: the label's class always gets its box
        hits += iou(xyxy(true_boxes[0]), held.boxes[i]) >= 0.5
    # Chance is 25%; a whole-image box never reaches IoU 0.5 here (shapes cover at most ~30% of the image).
    assert correct / n >= 0.7, f"top-1 accuracy {correct / n:.2f}"
    assert hits / n >= 0.5, f"IoU>=0.5 for {hits / n:.2f} of the true-class boxes"




def test_written_tables_have_exactly_the_declared_schemas(labelled_run):
    """Each Parquet file a run writes, read raw with pyarrow (not through results.read_table), carries the schema
    declared once in models/schema.py: same fields, types and nullability, in order."""
    import pyarrow.parquet as pq

    from weakloc.models import schema

    out = pathlib.Path(labelled_run["out"])
    declared = {"annotations": schema.ANNOTATION_SCHEMA_WITH_CAMS, "failures": schema.FAILURE_SCHEMA}
    for kind, want in declared.items():
        files = sorted(out.glob(f"{kind}-*.parquet"))
        assert files, kind
        for path in files:
            got = pq.read_schema(path)
            assert got.remove_metadata().equals(want.remove_metadata()), (kind, path.name, got, want)
