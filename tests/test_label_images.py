"""End-to-end `weakloc label` runs on image files by glob: folder labels, box modes, EXIF, batch-size parity.

Expectations come from how the inputs were made (ids, sizes, classes), never from a previous run.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from weakloc.models import synthetic
from weakloc.pipeline import results

from tests.helpers import (CLASSES, TINY_FEATURE, assert_boxes_inside, by_id, png_bytes, run, xyxy)


# --------------------------------------------------------------------------------------------------------------
# Image files by glob in a class-per-folder layout.
# --------------------------------------------------------------------------------------------------------------


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


