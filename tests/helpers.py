"""Helpers the tests share: tiny seeded models, ../shared paths, label runs and box arithmetic.

Fixtures live in conftest.py; everything a test imports by name lives here.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

SHARED = pathlib.Path(os.environ.get("WEAKLOC_SHARED_DATA") or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")
RUNNER = "FnApiRunner"  # never DirectRunner here: it would try to download Prism first


def shared_path(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, or skip the test where a user's clone has no ../shared."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (absent in a plain clone)")
    return path


def tiny_gap_model(
    num_classes: int = 3,
    input_size=(32, 32),
    *,
    activation: str = "softmax",
    channels: int = 8,
    seed: int = 0,
):
    """conv -> relu -> conv (stride 2) -> GAP -> Dense; random but seeded weights."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((*input_size, 3))
    x = layers.Conv2D(channels, 3, padding="same", activation="relu", name="c1")(inp)
    x = layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu", name="features")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, activation=activation, name="head")(x)
    return keras.Model(inp, out)


def save_model(model, directory: pathlib.Path, name: str, sidecar: dict | None = None) -> str:
    path = directory / f"{name}.keras"
    model.save(path)
    if sidecar is not None:
        (directory / f"{name}.json").write_text(json.dumps(sidecar))
    return str(path)


# Image ids that must never become paths outside an output folder (export file names, report thumbnails).
HOSTILE_IDS = ("../../etc/x", "gs://b/a.jpg", "C:\\dir\\img 4.png", "/abs/path/../y.png", "", "same/name", "same_name",
               "<img src=x onerror=alert(1)>")

CLASSES = ("cat", "dog", "bird")  # tiny_model_path's sidecar
TINY_INPUT = 32
TINY_FEATURE = 16  # tiny model: conv (same) -> conv stride 2 -> GAP, so a 32x32 input gives a 16x16 map


def run(*argv: str) -> dict:
    """`weakloc label` on the local FnApiRunner (never DirectRunner, which would try to download Prism)."""
    from weakloc.pipeline import label

    return label.run([*argv, f"--runner={RUNNER}"])


def label_argv(shard, model, out, *extra):
    return ["--input", shard, "--model", model, "--output", str(out), *extra]


def expect_refusal(exc_type, argv, out, match=None):
    """`run(*argv)` raises exc_type (matching `match`) and leaves `out` without any file."""
    with pytest.raises(exc_type, match=match):
        run(*argv)
    assert not out.exists() or not any(out.iterdir()), "a refused run must not write anything"


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
    from weakloc.models import synthetic

    return synthetic.encode_png(pixels)


def canonical_rows(output: str, root: str = ""):
    """(annotation rows keyed by image id, sorted failure tuples) of a run, box lists sorted and `root` taken off
    every source: what must not depend on the runner, the number of workers or the disk the run read from."""
    from weakloc.pipeline import results

    def strip(source):
        return source.replace(root.rstrip("/") + "/", "") if root else source

    rows = {}
    for r in results.read_table(output).to_pylist():
        r["source"] = strip(r["source"])
        r["boxes"] = sorted(r["boxes"], key=lambda b: (b["class_id"], b["xmin"], b["ymin"]))
        rows[r["image_id"]] = r
    fails = sorted((strip(f["source"]), f["image_id"], f["stage"], f["error"])
                   for f in results.read_table(output, "failures").to_pylist())
    return rows, fails


def assert_same_rows(actual, expected):
    """Two `canonical_rows`: every value that is not a float identical, floats within float32 round-off (workers
    that batch differently may reorder a reduction)."""
    import math

    (got, got_fail), (want, want_fail) = actual, expected
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
