"""Boxes are on the object as a viewer sees it: EXIF orientations 1-8 (predicted and ground-truth boxes), and odd
pictures (1x1, 1x10,000, animated GIF, 16-bit PNG, CMYK JPEG) through the whole pipeline."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from weakloc.models import boxes, records
from weakloc.pipeline import label, results

from tests.helpers import RUNNER

# What Pillow's exif_transpose does to the stored picture for each tag, and the inverse a producer applies to
# a viewer's picture before tagging it.
SHOW = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90}
STORE = {**SHOW, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def mask_box(mask: Image.Image) -> np.ndarray:
    """Normalised x0y0x1y1 (max edge exclusive) of the non-zero pixels of a mode-L mask."""
    x0, y0, x1, y1 = mask.getbbox()
    w, h = mask.size
    return np.array([x0 / w, y0 / h, x1 / w, y1 / h], np.float32)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_normalized_boxes_matches_pillow(orientation):
    stored = Image.new("L", (40, 24))
    stored.paste(255, (3, 5, 17, 11))  # an off-centre, non-square box
    viewer = stored.transpose(SHOW[orientation]) if orientation > 1 else stored
    got = boxes.orient_normalized_boxes(mask_box(stored)[None], orientation)[0]
    np.testing.assert_allclose(got, mask_box(viewer), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# EXIF 1-8 end to end with a model that finds the shapes.
# --------------------------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _iou(a, b) -> float:
    return float(boxes.box_iou(np.asarray([a], np.float32), np.asarray([b], np.float32))[0, 0])


@pytest.fixture(scope="module")
def exif_run(shapes_model, tmp_path_factory):
    model_path, held = shapes_model
    root = tmp_path_factory.mktemp("exif")
    n = 12
    truth = {}  # image index -> viewer box in pixels
    frames = []
    for i in range(n):
        # The viewer's picture: 72 wide, 48 tall (the 48x48 shape image stretched), so rotations change the size.
        viewer = Image.fromarray(held.images[i]).resize((72, 48), Image.Resampling.BILINEAR)
        x0, y0, x1, y1 = held.boxes[i]
        truth[i] = np.array([x0 * 1.5, y0, x1 * 1.5, y1], np.float32)
        mask = Image.new("L", (72, 48))
        mask.paste(255, tuple(int(round(v)) for v in truth[i]))
        for fmt in ("PNG", "JPEG"):
            for k in range(1, 9):
                stored = viewer.transpose(STORE[k]) if k > 1 else viewer
                stored_mask = mask.transpose(STORE[k]) if k > 1 else mask
                # Ground truth as a TF Object Detection producer stores it: normalised to the stored grid.
                gt = mask_box(stored_mask).tolist()
                frames.append(records.frame_record(records.make_example(
                    _encode(stored, fmt, k), source_id=f"{i}-{fmt}-{k}", labels=[int(held.labels[i])],
                    boxes=[gt], box_labels=[int(held.labels[i])])))
    shard = root / "exif.tfrecord"
    shard.write_bytes(b"".join(frames))
    out = root / "out"
    label.run(["--input", str(shard), "--model", model_path, "--output", str(out), "--classes", "labels",
               "--cam_threshold", "0.5", f"--runner={RUNNER}"])
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    return n, truth, rows


def _box(row):
    (b,) = row["boxes"]
    return np.array([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], np.float32)


def test_exif_every_orientation_reports_the_viewers_size_and_truth(exif_run):
    n, truth, rows = exif_run
    assert len(rows) == n * 2 * 8
    for image_id, row in rows.items():
        i = int(image_id.split("-")[0])
        assert (row["width"], row["height"]) == (72, 48)
        (gt,) = row["gt_boxes"]
        np.testing.assert_allclose([gt["xmin"], gt["ymin"], gt["xmax"], gt["ymax"]], truth[i], atol=1.0)


def test_exif_every_orientation_boxes_the_object_where_a_viewer_sees_it(exif_run):
    n, truth, rows = exif_run
    upright_hits = [i for i in range(n) if _iou(_box(rows[f"{i}-PNG-1"]), truth[i]) >= 0.5]
    assert len(upright_hits) >= n // 2, "the model should find most shapes upright"
    for i in range(n):
        upright = _box(rows[f"{i}-PNG-1"])
        for k in range(2, 9):
            # Lossless: the model sees the same pixels whatever the tag, so the box is the same box.
            np.testing.assert_allclose(_box(rows[f"{i}-PNG-{k}"]), upright, atol=0.5, err_msg=f"{i} PNG {k}")
            # JPEG: each stored grid compresses differently; the box stays on the same place.
            assert _iou(_box(rows[f"{i}-JPEG-{k}"]), _box(rows[f"{i}-JPEG-1"])) >= 0.6, (i, k)
    for i in upright_hits:
        for fmt in ("PNG", "JPEG"):
            for k in range(1, 9):
                assert _iou(_box(rows[f"{i}-{fmt}-{k}"]), truth[i]) >= 0.4, (i, fmt, k)


# --------------------------------------------------------------------------------------------------------------
# Odd pictures through the whole pipeline.
# --------------------------------------------------------------------------------------------------------------


def test_odd_pictures_are_annotated_with_boxes_inside(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(3)
    made = {}

    def save(name, img, fmt, **kw):
        img.save(d / name, format=fmt, **kw)
        made[str(d / name)] = img.size

    save("1x1.png", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    save("1x10000.png", Image.fromarray(rng.integers(0, 256, (10_000, 1, 3), dtype=np.uint8)), "PNG")
    save("10000x1.png", Image.fromarray(rng.integers(0, 256, (1, 10_000, 3), dtype=np.uint8)), "PNG")
    frames = [Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)) for _ in range(5)]
    save("anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    save("sixteen.png", Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16), mode="I;16"), "PNG")
    save("cmyk.jpg", Image.fromarray(rng.integers(0, 256, (25, 35, 4), dtype=np.uint8), mode="CMYK"), "JPEG")
    out = tmp_path / "out"
    summary = label.run(["--input", str(d / "*"), "--input_format", "images", "--model", tiny_model_path,
                         "--output", str(out), "--classes", "both", "--top_k", "2", f"--runner={RUNNER}"])
    assert summary["counts"]["annotated"] == len(made) and summary["counts"]["failed"] == 0
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    assert set(rows) == set(made)
    for image_id, (w, h) in made.items():
        row = rows[image_id]
        assert (row["width"], row["height"]) == (w, h), image_id
        assert row["boxes"], image_id  # a random model still gives a CAM with a location
        for b in row["boxes"]:
            assert 0 <= b["xmin"] < b["xmax"] <= w and 0 <= b["ymin"] < b["ymax"] <= h, (image_id, b)
            assert np.isfinite([b["score"], b["cam_score"]]).all()
