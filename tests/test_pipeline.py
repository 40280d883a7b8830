"""End-to-end runs of `weakloc label` on the local FnApiRunner, read back through `results`.

Each module-scoped fixture runs the pipeline once on small synthetic data and many tests assert on its output.
Expectations come from how the inputs were made (ids, sizes, boxes, labels), never from a previous run.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from weakloc.models import records, synthetic
from weakloc.models.thresholds import ThresholdsError
from weakloc.models.cam import ModelStructureError
from weakloc.models.sidecar import SidecarError
from weakloc.pipeline import label, results
from weakloc.pipeline.options import OptionsError

from tests.conftest import RUNNER, save_model

CLASSES = ("cat", "dog", "bird")  # tiny_model_path's sidecar
TINY_INPUT = 32
TINY_FEATURE = 16  # tiny model: conv (same) -> conv stride 2 -> GAP, so a 32x32 input gives a 16x16 map


def run(*argv: str) -> dict:
    return label.run([*argv, f"--runner={RUNNER}"])


def sha16(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def by_id(table) -> dict[str, dict]:
    rows = table.to_pylist()
    out = {r["image_id"]: r for r in rows}
    assert len(out) == len(rows), "image_id repeated"
    return out


def xyxy(b) -> tuple[float, float, float, float]:
    return (b["xmin"], b["ymin"], b["xmax"], b["ymax"])


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_boxes_inside(row):
    for b in row["boxes"]:
        assert 0.0 <= b["xmin"] < b["xmax"] <= row["width"] + 1e-3, (b, row["width"])
        assert 0.0 <= b["ymin"] < b["ymax"] <= row["height"] + 1e-3, (b, row["height"])
        assert 0.0 <= b["cam_score"] <= 1.0 + 1e-6
        assert 0.0 <= b["score"] <= 1.0 + 1e-6


def png_bytes(pixels: np.ndarray) -> bytes:
    return synthetic.encode_png(pixels)


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


# --------------------------------------------------------------------------------------------------------------
# Image files by glob in a class-per-folder layout.
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory):
    """root/<class>/*.png, 3 images per class (one non-square per class); returns (root, {path: class})."""
    root = tmp_path_factory.mktemp("folders")
    data = synthetic.make_shapes(9, size=40, seed=5)
    truth = {}
    for i in range(9):
        cls = CLASSES[i % 3]
        (root / cls).mkdir(exist_ok=True)
        img = data.images[i]
        if i < 3:
            img = np.concatenate([img, img[:, :12]], axis=1)  # 52 wide, 40 tall
        path = root / cls / f"img{i}.png"
        path.write_bytes(png_bytes(img))
        truth[str(path)] = (cls, img.shape[1], img.shape[0])
    return root, truth


@pytest.fixture(scope="module")
def folder_runs(folder_tree, tiny_model_path, tmp_path_factory):
    """Several runs over the same folder tree, each with different box options."""
    root, _ = folder_tree
    base = tmp_path_factory.mktemp("folder_runs")
    variants = {
        "labels": ["--classes", "labels"],
        "both": ["--classes", "both", "--emit_cams"],
        "top2": ["--top_k", "2"],
        "largest": ["--cam_threshold", "0.6"],
        "all": ["--boxes", "all", "--min_box_area", "0", "--cam_threshold", "0.6"],
    }
    out = {}
    for name, flags in variants.items():
        o = base / name
        summary = run("--input", str(root / "*" / "*.png"), "--model", tiny_model_path, "--output", str(o), *flags)
        out[name] = (summary, by_id(results.read_table(str(o))), results.read_table(str(o)))
    return out


def test_images_rows_ids_sizes_and_folder_labels(folder_tree, folder_runs):
    _, truth = folder_tree
    summary, rows, _ = folder_runs["labels"]
    assert set(rows) == set(truth)
    assert summary["counts"]["read"] == summary["counts"]["annotated"] == 9
    assert summary["input_format"] == "images" and summary["options"]["folder_labels"] is True
    for path, (cls, w, h) in truth.items():
        row = rows[path]
        assert row["source"] == path
        assert (row["width"], row["height"]) == (w, h)
        assert row["labels"] == [{"class_id": CLASSES.index(cls), "label": cls}]
        assert row["gt_boxes"] == []
        assert_boxes_inside(row)


def test_classes_labels_boxes_the_folder_class(folder_tree, folder_runs):
    _, truth = folder_tree
    _, rows, _ = folder_runs["labels"]
    for path, (cls, _, _) in truth.items():
        assert [b["label"] for b in rows[path]["boxes"]] == [cls]
        assert [b["class_id"] for b in rows[path]["boxes"]] == [CLASSES.index(cls)]


def test_classes_both_boxes_prediction_and_label(folder_tree, folder_runs):
    _, truth = folder_tree
    _, rows, _ = folder_runs["both"]
    for path, (cls, _, _) in truth.items():
        row = rows[path]
        want = {row["classes"][0]["class_id"], CLASSES.index(cls)}
        got = [b["class_id"] for b in row["boxes"]]
        assert sorted(got) == sorted(want)  # one box per class, no duplicate when prediction == label
        assert_boxes_inside(row)


def test_emit_cams_match_feature_map(folder_tree, folder_runs):
    _, truth = folder_tree
    _, rows, table = folder_runs["both"]
    assert "cams" in table.column_names
    assert "cams" not in folder_runs["labels"][2].column_names
    for path, (cls, _, _) in truth.items():
        row = rows[path]
        cams = row["cams"]
        # top-1 map, then the label's map
        assert [c["class_id"] for c in cams] == [row["classes"][0]["class_id"], CLASSES.index(cls)]
        for c in cams:
            assert (c["height"], c["width"]) == (TINY_FEATURE, TINY_FEATURE)
            assert len(c["values"]) == TINY_FEATURE * TINY_FEATURE
            assert np.all(np.isfinite(c["values"]))
            assert np.ptp(c["values"]) > 0


def test_top_k_2_gives_two_classes_and_boxes(folder_runs):
    _, rows, _ = folder_runs["top2"]
    for row in rows.values():
        ids = [c["class_id"] for c in row["classes"]]
        assert len(ids) == 2 and len(set(ids)) == 2
        assert sorted(b["class_id"] for b in row["boxes"]) == sorted(ids)


def test_boxes_all_contains_the_largest(folder_runs):
    _, largest, _ = folder_runs["largest"]
    _, every, _ = folder_runs["all"]
    assert set(largest) == set(every)
    more = 0
    for image_id, row in largest.items():
        all_boxes = [xyxy(b) for b in every[image_id]["boxes"]]
        assert len(all_boxes) >= len(row["boxes"])
        more += len(all_boxes) > len(row["boxes"])
        for b in row["boxes"]:
            assert any(np.allclose(xyxy(b), a, atol=1e-4) for a in all_boxes)
        assert_boxes_inside(every[image_id])
    # at a high threshold on an untrained model some map splits into several components
    assert more >= 1


def test_labels_from_folder_no(folder_tree, tiny_model_path, tmp_path):
    root, truth = folder_tree
    run("--input", str(root / "*" / "*.png"), "--model", tiny_model_path, "--output", str(tmp_path / "o"),
        "--labels_from_folder", "no")
    rows = by_id(results.read_table(str(tmp_path / "o")))
    assert set(rows) == set(truth)
    assert all(r["labels"] == [] for r in rows.values())


# --------------------------------------------------------------------------------------------------------------
# EXIF orientation and batch-size parity.
# --------------------------------------------------------------------------------------------------------------


def test_exif_orientation_reports_viewer_size(tiny_model_path, tmp_path):
    raw_w, raw_h = 60, 36
    pixels = np.zeros((raw_h, raw_w, 3), np.uint8)
    pixels[:, : raw_w // 3] = (220, 30, 30)
    pixels[4:12, 30:50] = (30, 220, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif, quality=95)
    path = tmp_path / "in" / "rotated.jpg"
    path.parent.mkdir()
    path.write_bytes(buf.getvalue())
    with Image.open(path) as im:  # the fixture itself: a viewer shows it 36 wide, 60 tall
        assert im.size == (raw_w, raw_h)
        assert ImageOps.exif_transpose(im).size == (raw_h, raw_w)
    run("--input", str(path), "--model", tiny_model_path, "--output", str(tmp_path / "o"))
    (row,) = results.read_table(str(tmp_path / "o")).to_pylist()
    assert (row["width"], row["height"]) == (raw_h, raw_w)
    assert_boxes_inside(row)


def test_batch_size_does_not_change_rows(tiny_model_path, tmp_path):
    data = synthetic.make_shapes(10, size=40, seed=8)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(10):
        (d / f"{i:02d}.png").write_bytes(png_bytes(data.images[i]))
    tables = {}
    for bs in (1, 7):
        out = tmp_path / f"bs{bs}"
        summary = run("--input", str(d / "*.png"), "--model", tiny_model_path, "--output", str(out),
                      "--batch_size", str(bs), "--top_k", "2", "--emit_cams")
        assert summary["counts"]["annotated"] == 10
        tables[bs] = by_id(results.read_table(str(out)))
    assert set(tables[1]) == set(tables[7]) and len(tables[1]) == 10
    for image_id, a in tables[1].items():
        b = tables[7][image_id]
        assert (a["width"], a["height"], a["source"]) == (b["width"], b["height"], b["source"])
        assert [c["class_id"] for c in a["classes"]] == [c["class_id"] for c in b["classes"]]
        np.testing.assert_allclose([c["score"] for c in a["classes"]], [c["score"] for c in b["classes"]],
                                   atol=1e-5)
        assert [x["class_id"] for x in a["boxes"]] == [x["class_id"] for x in b["boxes"]]
        np.testing.assert_allclose([xyxy(x) for x in a["boxes"]], [xyxy(x) for x in b["boxes"]], atol=1e-3)
        for ca, cb in zip(a["cams"], b["cams"], strict=True):
            np.testing.assert_allclose(ca["values"], cb["values"], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Option errors: raised by label.run before anything runs or is written.
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_shard")
    data = synthetic.make_shapes(3, size=40, seed=9)
    path = d / "s.tfrecord"
    path.write_bytes(b"".join(
        records.frame_record(records.make_example(png_bytes(data.images[i]), source_id=f"s{i}")) for i in range(3)))
    return str(path)


def _argv(shard, model, out, *extra):
    return ["--input", shard, "--model", model, "--output", str(out), *extra]


def _expect_refusal(exc_type, argv, out, match=None):
    with pytest.raises(exc_type, match=match):
        run(*argv)
    assert not out.exists() or not any(out.iterdir()), "a refused run must not write anything"


def test_refuses_input_matching_nothing(tiny_model_path, tmp_path):
    out = tmp_path / "o"
    _expect_refusal(OptionsError, _argv(str(tmp_path / "nothing-*.tfrecord"), tiny_model_path, out), out,
                    match="matches no file")


def test_refuses_existing_output_then_overwrite_replaces_it(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    first = run(*_argv(small_shard, tiny_model_path, out, "--num_shards", "3"))
    assert len(first["files"]["annotations"]) == 3
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OptionsError, match="--overwrite"):
        run(*_argv(small_shard, tiny_model_path, out, "--num_shards", "1"))
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    second = run(*_argv(small_shard, tiny_model_path, out, "--num_shards", "1", "--overwrite"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["annotations-00000-of-00001.parquet", "failures-00000-of-00001.parquet", "summary.json"]
    assert [os.path.basename(f) for f in second["files"]["annotations"]] == ["annotations-00000-of-00001.parquet"]
    table = results.read_table(str(out))
    assert sorted(table.column("image_id").to_pylist()) == ["s0", "s1", "s2"]  # no rows of the first run


def test_overwrite_keeps_foreign_files(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    run(*_argv(small_shard, tiny_model_path, out))
    (out / "README.txt").write_text("not weakloc's")
    run(*_argv(small_shard, tiny_model_path, out, "--overwrite"))
    assert (out / "README.txt").read_text() == "not weakloc's"


@pytest.mark.parametrize("flags", [
    ["--cam_threshold", "1.5"],
    ["--cam_threshold", "-0.1"],
    ["--min_score", "2"],
    ["--min_box_area", "-1"],
])
def test_refuses_values_outside_unit_interval(small_shard, tiny_model_path, tmp_path, flags):
    out = tmp_path / "o"
    _expect_refusal(OptionsError, _argv(small_shard, tiny_model_path, out, *flags), out, match=r"\[0, 1\]")


@pytest.mark.parametrize("doc, match", [
    ({"default": 1.5}, "default"),
    ({"per_class": {"dog": -0.2}}, "dog"),
    ({"default": 0.3, "per_class": {"zebra": 0.4}}, "zebra"),
    ([0.3, 0.4], "object"),
])
def test_refuses_bad_thresholds_file(small_shard, tiny_model_path, tmp_path, doc, match):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps(doc))
    out = tmp_path / "o"
    _expect_refusal(ThresholdsError, _argv(small_shard, tiny_model_path, out, "--thresholds", str(thr)), out,
                    match=match)


def test_thresholds_file_is_applied(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.35, "per_class": {"bird": 0.7}}))
    summary = run(*_argv(small_shard, tiny_model_path, tmp_path / "o", "--thresholds", str(thr)))
    assert summary["options"]["cam_threshold"] == 0.35
    assert summary["options"]["per_class_thresholds"] == {"bird": 0.7}


def test_refuses_sidecar_with_wrong_class_count(small_shard, tiny_model_path, tmp_path):
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0,
                                "class_names": ["cat", "dog"]}))
    out = tmp_path / "o"
    _expect_refusal(SidecarError, _argv(small_shard, tiny_model_path, out, "--sidecar", str(side)), out,
                    match="2 names.*3 classes")
    _expect_refusal(SidecarError, _argv(small_shard, tiny_model_path, out, "--class_names", "a,b,c,d"), out,
                    match="4 names")


def test_refuses_sidecar_with_wrong_input_size(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    _expect_refusal(SidecarError, _argv(small_shard, tiny_model_path, out, "--input_size", "64,64"), out,
                    match="does not match")


def test_refuses_model_without_gap_head(small_shard, tmp_path):
    import keras
    from keras import layers

    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = layers.Flatten()(x)
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(x))
    path = save_model(model, tmp_path, "flat", {"input_size": [32, 32], "class_names": list(CLASSES)})
    out = tmp_path / "o"
    _expect_refusal(ModelStructureError, _argv(small_shard, path, out), out, match="GlobalAveragePooling2D")


@pytest.mark.parametrize("flags, match", [
    (["--cam_treshold", "0.3"], "cam_treshold"),  # a typo
    (["--no_such_flag=1"], "no_such_flag"),
    # an abbreviation is not a flag: it must not silently become --top_k
    (["--top", "2"], "--top"),
])
def test_refuses_unknown_flags(small_shard, tiny_model_path, tmp_path, flags, match):
    out = tmp_path / "o"
    _expect_refusal(OptionsError, _argv(small_shard, tiny_model_path, out, *flags), out, match=match)


def test_refuses_stray_positional_arguments(small_shard, tiny_model_path, tmp_path):
    # An unquoted glob expanded by the shell: `--input a.tfrecord b.tfrecord` must not silently drop b.
    out = tmp_path / "o"
    _expect_refusal(OptionsError, _argv(small_shard, tiny_model_path, out) + [small_shard + ".other"], out,
                    match="other")


def test_beam_flag_that_prefixes_a_weakloc_flag_passes_through(small_shard, tiny_model_path, tmp_path):
    # Dataflow's --labels (job labels) starts like --labels_from_folder; it is Beam's, not an abbreviation.
    summary = run(*_argv(small_shard, tiny_model_path, tmp_path / "o", "--labels", "team=vision"))
    assert summary["counts"]["annotated"] == 3


@pytest.mark.parametrize("flags, match", [
    (["--top_k", "4"], "larger than the model's 3 classes"),
    (["--top_k", "0"], ">= 1"),
    (["--batch_size", "0"], ">= 1"),
])
def test_refuses_bad_counts(small_shard, tiny_model_path, tmp_path, flags, match):
    out = tmp_path / "o"
    _expect_refusal(OptionsError, _argv(small_shard, tiny_model_path, out, *flags), out, match=match)


def test_box_stretch_from_thresholds_file_scales_boxes_about_their_centres(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5}))
    plain = run(*_argv(small_shard, tiny_model_path, tmp_path / "a", "--thresholds", str(thr)))
    thr.write_text(json.dumps({"default": 0.5, "box_stretch": [0.5, 0.5]}))
    half = run(*_argv(small_shard, tiny_model_path, tmp_path / "b", "--thresholds", str(thr)))
    assert plain["options"]["box_stretch"] == [1.0, 1.0] and half["options"]["box_stretch"] == [0.5, 0.5]
    key = lambda r: r["image_id"]
    rows_a = sorted(results.read_table(str(tmp_path / "a")).to_pylist(), key=key)
    rows_b = sorted(results.read_table(str(tmp_path / "b")).to_pylist(), key=key)
    assert rows_a and all(r["boxes"] for r in rows_a)
    for ra, rb in zip(rows_a, rows_b):
        a, b = ra["boxes"][0], rb["boxes"][0]
        # Half the width and height, same centre (input 32 px -> original 40 px: still a linear map).
        assert b["xmax"] - b["xmin"] == pytest.approx((a["xmax"] - a["xmin"]) / 2, abs=1e-4)
        assert b["ymax"] - b["ymin"] == pytest.approx((a["ymax"] - a["ymin"]) / 2, abs=1e-4)
        assert b["xmin"] + b["xmax"] == pytest.approx(a["xmin"] + a["xmax"], abs=1e-4)
    with pytest.raises(OptionsError, match="box_stretch"):
        run(*_argv(small_shard, tiny_model_path, tmp_path / "c", "--thresholds", str(thr), "--box_stretch", "2"))


def _halving_refiner(taus=(0.3, 0.6)) -> dict:
    """A refinement whose only non-zero coefficient is the intercept: log(w'/w) = log(h'/h) = log 0.5."""
    f = 2 + 4 * len(taus)
    coef = np.zeros((f + 1, 4))
    coef[-1, 2:] = np.log(0.5)
    return {"taus": list(taus), "alpha": 1.0, "mean": [0.0] * f, "scale": [1.0] * f, "coef": coef.tolist()}


def test_box_refine_and_cam_contrast_from_thresholds_file(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5}))
    plain = run(*_argv(small_shard, tiny_model_path, tmp_path / "a", "--thresholds", str(thr)))
    thr.write_text(json.dumps({"default": 0.5, "box_refine": _halving_refiner()}))
    half = run(*_argv(small_shard, tiny_model_path, tmp_path / "b", "--thresholds", str(thr)))
    assert not plain["options"]["box_refine"] and half["options"]["box_refine"]
    key = lambda r: r["image_id"]
    rows_a = sorted(results.read_table(str(tmp_path / "a")).to_pylist(), key=key)
    rows_b = sorted(results.read_table(str(tmp_path / "b")).to_pylist(), key=key)
    assert rows_a and all(r["boxes"] for r in rows_a)
    for ra, rb in zip(rows_a, rows_b):
        a, b = ra["boxes"][0], rb["boxes"][0]
        assert b["xmax"] - b["xmin"] == pytest.approx((a["xmax"] - a["xmin"]) / 2, abs=1e-3)
        assert b["ymax"] - b["ymin"] == pytest.approx((a["ymax"] - a["ymin"]) / 2, abs=1e-3)
        assert b["ymin"] + b["ymax"] == pytest.approx(a["ymin"] + a["ymax"], abs=1e-3)
    # --no_box_refine gives the plain boxes back; the file's cam_contrast switches contrast CAMs on.
    thr.write_text(json.dumps({"default": 0.5, "box_refine": _halving_refiner(), "cam_contrast": True}))
    off = run(*_argv(small_shard, tiny_model_path, tmp_path / "c", "--thresholds", str(thr), "--no_box_refine"))
    assert not off["options"]["box_refine"] and off["options"]["cam_contrast"]
    assert not plain["options"]["cam_contrast"]


@pytest.mark.parametrize("doc, flags, match", [
    # A malformed document is the thresholds file's own error (ThresholdsError); the rest are OptionsErrors.
    ({"box_refine": {"taus": [0.5]}}, [], "malformed"),
    ({"box_refine": _halving_refiner()}, ["--box_stretch", "2,2"], "combined with --box_stretch"),
    ({"box_refine": _halving_refiner(), "box_stretch": [1.2, 1.0]}, [], "combined with the file's box_stretch"),
    ({"box_refine": _halving_refiner()}, ["--boxes", "all"], "combined with --boxes all"),
    ({"box_refine": _halving_refiner()}, ["--cam_threshold", "0.3"], "combined with --cam_threshold"),
    ({"box_refine": _halving_refiner()}, ["--method", "gradcam"], "combined with --method gradcam"),
    ({"cam_contrast": True}, ["--method", "gradcam"], "calibrated on contrast CAMs"),
    ({"cam_contrast": "yes"}, [], "true or false"),
    ({}, ["--cam_contrast", "--method", "gradcam"], "gradcam"),
])
def test_refuses_refinement_that_cannot_apply(small_shard, tiny_model_path, tmp_path, doc, flags, match):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5, **doc}))
    out = tmp_path / "o"
    kind = ThresholdsError if match in ("malformed", "true or false") else OptionsError
    _expect_refusal(kind, _argv(small_shard, tiny_model_path, out, "--thresholds", str(thr), *flags), out,
                    match=match)


def test_contrast_cams_are_the_class_cam_minus_the_mean_class_cam(small_shard, tiny_model_path, tmp_path):
    """Through the whole pipeline: with all 3 classes' CAMs emitted, contrast CAM_c = CAM_c - mean_c' CAM_c'."""
    flags = ("--emit_cams", "--top_k", "3", "--cam_threshold", "0.5")
    run(*_argv(small_shard, tiny_model_path, tmp_path / "plain", *flags))
    run(*_argv(small_shard, tiny_model_path, tmp_path / "contrast", *flags, "--cam_contrast"))

    def cams(out):
        rows = results.read_table(str(tmp_path / out)).to_pylist()
        return {r["image_id"]: {c["class_id"]: np.array(c["values"]) for c in r["cams"]} for r in rows}

    plain, contrast = cams("plain"), cams("contrast")
    assert sorted(plain) == sorted(contrast) == ["s0", "s1", "s2"]
    for image_id, maps in plain.items():
        mean = np.mean([maps[c] for c in range(3)], axis=0)
        for c in range(3):
            np.testing.assert_allclose(contrast[image_id][c], maps[c] - mean, rtol=1e-4, atol=1e-5)


def test_label_refines_exactly_as_calibrate_fitted(tiny_model_path, tmp_path):
    """A refinement fitted on calibrate's own maps (per-class thresholds, contrast CAMs) and written to the file
    gives label's boxes: the same maps, thresholds and order (refine at model resolution, then scale)."""
    from weakloc.models import boxes as boxlib
    from weakloc.models import opening, refine
    from weakloc.pipeline import calibrate, inputs

    data = synthetic.make_shapes(24, size=40, seed=3)
    shard = tmp_path / "boxed.tfrecord"
    shard.write_bytes(b"".join(records.frame_record(records.make_example(
        png_bytes(data.images[i]), source_id=f"b{i}", labels=[int(data.labels[i]) % 3],
        boxes=[list(np.asarray(data.boxes[i]) / 40)], box_labels=[int(data.labels[i]) % 3])) for i in range(24)))
    opened = opening.open_model(tiny_model_path, contrast=True)
    model, prep = opened.build(), opened.spec.prep
    source = inputs.scan([str(shard)], class_names=prep.class_names)
    examples = list(inputs.iterate(source, input_size=prep.input_size))
    normed, valid, truths, classes, _, _ = calibrate.class_maps(model, iter(examples))
    per_class = {"cat": 0.3, "dog": 0.7}
    taus = np.array([per_class.get(prep.class_names[c], 0.5) for c in classes], np.float32)
    refiner, _ = refine.fit(normed, taus, truths, valid=valid)
    expected, has = refiner.apply(normed, taus, valid)
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5, "per_class": per_class, "box_refine": refiner.to_json(),
                               "cam_contrast": True}))
    out = tmp_path / "o"
    run("--input", str(shard), "--model", tiny_model_path, "--output", str(out), "--thresholds", str(thr),
        "--classes", "labels")
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    assert has.sum() >= 20
    for i in np.flatnonzero(has):
        ex = examples[i]
        (box,) = [b for b in rows[ex.image_id]["boxes"] if b["class_id"] == classes[i]]
        want = boxlib.scale_boxes(expected[i], prep.input_size, (ex.height, ex.width))[0]
        np.testing.assert_allclose([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], want, atol=1e-4)


@pytest.mark.parametrize("extra, match", [
    (["--refine_boxes", "--fit_box_stretch"], "--refine_boxes"),
    (["--refine_boxes", "--boxes", "union"], "--refine_boxes"),
    (["--cam_contrast", "ONE_CLASS"], "at least two classes"),
])
def test_calibrate_refuses_what_cannot_be_calibrated(small_shard, tiny_model_path, tmp_path, capsys, extra, match):
    from tests.conftest import save_model, tiny_gap_model
    from weakloc.pipeline import cli

    model = tiny_model_path
    if "ONE_CLASS" in extra:
        extra = [e for e in extra if e != "ONE_CLASS"]
        model = save_model(tiny_gap_model(num_classes=1, activation="sigmoid"), tmp_path, "one",
                           {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "class_names": ["thing"]})
    code = cli.main(["calibrate", "--input", small_shard, "--model", model, "--output", str(tmp_path / "t.json"),
                     *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "t.json").exists()
