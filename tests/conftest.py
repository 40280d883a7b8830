"""Shared fixtures: tiny seeded GAP models saved with their sidecars, labelled runs and input trees.

Models are built fresh per session from a seed (no downloads) and saved to a temp dir, so every test that loads
one exercises the real `.keras` loading path with safe_mode on.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Helpers are imported from tests.helpers; these names stay importable from here for older test modules.
from tests.helpers import (  # noqa: E402, F401
    CLASSES,
    HOSTILE_IDS,
    RUNNER,
    SHARED,
    png_bytes,
    save_model,
    shared_path,
    tiny_gap_model,
)

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


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory):
    """Converted graphs (--engine openvino, the default where installed) go to a session folder, not ~/.cache;
    child processes the tests start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("engine_cache")
        mp.setenv("WEAKLOC_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


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


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory):
    """root/<class>/*.png, 3 images per class (one non-square per class); returns (root, {path: class})."""
    from weakloc.models import synthetic

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
def small_shard(tmp_path_factory):
    from weakloc.models import records, synthetic

    d = tmp_path_factory.mktemp("small_shard")
    data = synthetic.make_shapes(3, size=40, seed=9)
    path = d / "s.tfrecord"
    path.write_bytes(b"".join(
        records.frame_record(records.make_example(png_bytes(data.images[i]), source_id=f"s{i}")) for i in range(3)))
    return str(path)


@pytest.fixture
def engine_shards(tmp_path_factory):
    """For the engine tests: six 40x40 shape pictures with their labels in one TFRecord shard."""
    from weakloc.models import records, synthetic

    d = tmp_path_factory.mktemp("engine_shards")
    data = synthetic.make_shapes(6, size=40, seed=9)
    (d / "a.tfrecord").write_bytes(b"".join(
        records.frame_record(records.make_example(synthetic.encode_png(img), source_id=f"s{i}", labels=[i % 3]))
        for i, img in enumerate(data.images)))
    return str(d / "*.tfrecord")
