"""Shared fixtures: tiny seeded GAP models saved with their sidecars, and paths to ../shared data.

Models are built fresh per session from a seed (no downloads) and saved to a temp dir, so every test that loads
one exercises the real `.keras` loading path with safe_mode on.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A 3-class 32x32 softmax GAP model with a sidecar naming the classes."""
    d = tmp_path_factory.mktemp("tiny_model")
    return save_model(
        tiny_gap_model(),
        d,
        "tiny",
        {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "class_names": ["cat", "dog", "bird"]},
    )


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """A small CNN trained (briefly) on synthetic shapes, with sidecar; returns (path, held-out ShapesSet)."""
    from weakloc.models import sidecar, synthetic, train

    d = tmp_path_factory.mktemp("shapes_model")
    size = (48, 48)
    data = synthetic.make_shapes(1200, size=48, seed=10)
    prep = sidecar.Preprocessing(size, 1 / 255, 0.0, synthetic.SHAPES)
    model = train.small_gap_cnn(size, len(synthetic.SHAPES), width=8, seed=0)
    train.fit_in_memory(model, data.images, data.labels, prep=prep, epochs=3)
    path = save_model(model, d, "shapes", prep.to_json())
    return path, synthetic.make_shapes(64, size=48, seed=11)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Image ids that must never become paths outside an output folder (export file names, report thumbnails).
HOSTILE_IDS = ("../../etc/x", "gs://b/a.jpg", "C:\\dir\\img 4.png", "/abs/path/../y.png", "", "same/name", "same_name",
               "<img src=x onerror=alert(1)>")


@pytest.fixture(scope="session")
def labelled_run(tmp_path_factory, tiny_model_path) -> dict:
    """One `weakloc label --emit_cams --top_k 2` run on two TFRecord shards (one GZIP) for export and report tests.

    Ten 56x40 images (a 40x40 shape pasted at x=10) with an image label and one true box each, ids from
    HOSTILE_IDS (an empty id falls back to `<shard>:<index>`), plus one record whose image bytes are garbage (a
    decode failure row).
    """
    import gzip

    from weakloc.models import records, synthetic
    from weakloc.pipeline import label

    root = tmp_path_factory.mktemp("labelled_run")
    shards = root / "shards"
    shards.mkdir()
    data = synthetic.make_shapes(10, size=40, seed=5)
    names = ("cat", "dog", "bird")
    ids = (list(HOSTILE_IDS) + [f"plain-{i}" for i in range(10)])[:10]
    frames = []
    for i in range(10):
        canvas = np.full((40, 56, 3), 40, np.uint8)
        canvas[:, 10:50] = data.images[i]
        x0, y0, x1, y1 = (float(v) for v in data.boxes[i])
        frames.append(records.frame_record(records.make_example(
            synthetic.encode_png(canvas), source_id=ids[i] or None, labels=[i % 3], label_texts=[names[i % 3]],
            boxes=[[(x0 + 10) / 56, y0 / 40, (x1 + 10) / 56, y1 / 40]], box_labels=[i % 3],
            box_texts=[names[i % 3]])))
    frames.append(records.frame_record(records.make_example(b"not an image", source_id="garbage")))
    (shards / "a.tfrecord").write_bytes(b"".join(frames[:6]))
    (shards / "b.tfrecord").write_bytes(gzip.compress(b"".join(frames[6:])))
    out = root / "out"
    label.run(["--input", str(shards / "*.tfrecord"), "--model", tiny_model_path, "--output", str(out),
               "--top_k", "2", "--emit_cams", f"--runner={RUNNER}"])
    return {"out": str(out), "shards": shards, "model": tiny_model_path, "class_names": names}
