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
