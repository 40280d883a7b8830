"""`label --method coloc|fused` end to end (transforms/coloc.py): the statistics the job writes against numpy's PCA
of the same descriptors, 1 vs 2 workers, reused statistics giving the same boxes as recomputing them, the CombineFn
in any grouping, refusals, and multi-scale averaging against a direct computation."""
import json

import numpy as np
import pytest

from tests.conftest import RUNNER, tiny_gap_model
from weakloc.models import cam, coloc, images, records, synthetic
from weakloc.pipeline import label, results
from weakloc.pipeline.options import OptionsError
from weakloc.models.coloc import read_stats
from weakloc.transforms.coloc import ColocCombineFn

NAMES = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """24 labelled 32x32 shape pictures (8 per class), one true box each."""
    d = tmp_path_factory.mktemp("coloc_shard")
    data = synthetic.make_shapes(24, size=32, seed=21)
    frames = []
    for i in range(24):
        c = i % 3
        x0, y0, x1, y1 = (float(v) / 32 for v in data.boxes[i])
        frames.append(records.frame_record(records.make_example(
            synthetic.encode_png(data.images[i]), source_id=f"img{i:02d}", labels=[c], label_texts=[NAMES[c]],
            boxes=[[x0, y0, x1, y1]], box_labels=[c], box_texts=[NAMES[c]])))
    path = d / "s.tfrecord"
    path.write_bytes(b"".join(frames))
    return str(path), data


def _run(shard_path, model, out, *flags):
    return label.run(["--input", shard_path, "--model", model, "--output", str(out), "--classes", "labels",
                      "--batch_size", "5", f"--runner={RUNNER}", *flags])


def _boxes(out):
    rows = results.read_table(str(out), "annotations").to_pylist()
    return {r["image_id"]: [(b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in r["boxes"]]
            for r in rows}


@pytest.fixture(scope="module")
def coloc_run(shard, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("coloc_run") / "out"
    summary = _run(shard[0], tiny_model_path, out, "--method", "coloc")
    return out, summary


def test_written_statistics_are_numpys_pca_of_the_same_descriptors(shard, tiny_model_path, coloc_run):
    out, summary = coloc_run
    assert summary["counts"]["annotated"] == 24 and summary["options"]["method"] == "coloc"
    loaded = read_stats(str(out), class_names=NAMES)
    # Reference: the model's own feature layer on the same decoded pixels, float16 as the job keeps them.
    import keras

    model = keras.models.load_model(tiny_model_path)
    feat = keras.Model(model.inputs, model.get_layer("features").output)
    source_pixels = [images.decode_image(r.encoded, (32, 32)).pixels
                     for r in (records.parse_example(data) for _, data in records.iter_records(open(shard[0], "rb")))]
    f = feat.predict(np.stack(source_pixels).astype(np.float32) / 255, verbose=0).astype(np.float16)
    kernel = model.get_layer("head").get_weights()[0]
    assert sorted(loaded.components) == [0, 1, 2]
    for c in range(3):
        x = f[c::3].reshape(-1, f.shape[-1]).astype(np.float64)
        st = loaded.stats[c]
        assert (st.images, st.count) == (8, len(x))
        # Within float16 rounding: a value near a rounding edge may land on either side in the two computations.
        np.testing.assert_allclose(st.total, x.sum(0), rtol=1e-5)
        np.testing.assert_allclose(st.covariance(), np.cov(x, rowvar=False, bias=True), rtol=1e-4, atol=1e-6)
        vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
        comp = loaded.components[c]
        assert abs(float(np.dot(comp.direction, vecs[:, -1]))) == pytest.approx(1.0, abs=1e-4)
        assert float(np.dot(comp.direction, kernel[:, c])) >= 0  # signed by the class's CAM weights
    man = json.loads((out / coloc.MANIFEST_FILE).read_text())
    assert man["extractor"]["channels"] == f.shape[-1] and man["classes"]["dog"]["images"] == 8


def test_two_workers_give_the_same_statistics(shard, tiny_model_path, coloc_run, tmp_path):
    out1, _ = coloc_run
    out2 = tmp_path / "two"
    _run(shard[0], tiny_model_path, out2, "--method", "coloc", "--direct_num_workers=2",
         "--direct_running_mode=multi_threading")
    a, b = read_stats(str(out1)), read_stats(str(out2))
    for c in a.stats:
        np.testing.assert_allclose(b.stats[c].outer, a.stats[c].outer, rtol=1e-5)
        np.testing.assert_allclose(b.stats[c].total, a.stats[c].total, rtol=1e-5)
        np.testing.assert_allclose(b.components[c].direction, a.components[c].direction, atol=1e-5)
    assert _boxes(out2) == _boxes(out1)


def test_reused_statistics_give_the_same_boxes_as_recomputing(shard, tiny_model_path, coloc_run, tmp_path):
    out1, _ = coloc_run
    out2 = tmp_path / "reuse"
    summary = _run(shard[0], tiny_model_path, out2, "--method", "coloc", "--coloc_stats", str(out1))
    assert summary["options"]["coloc_stats"] == str(out1)
    assert not (out2 / coloc.STATS_FILE).exists()  # nothing recomputed
    first, second = _boxes(out1), _boxes(out2)
    assert len(first) == 24 and all(first.values())
    assert second == first
    # And the boxes are those of the projection, not of the CAM: at least one image's box differs.
    cam_out = tmp_path / "cam"
    _run(shard[0], tiny_model_path, cam_out)
    assert _boxes(cam_out) != first


def test_fused_run_labels_every_image(shard, tiny_model_path, coloc_run, tmp_path):
    out1, _ = coloc_run
    for mode in coloc.FUSE_MODES:
        out = tmp_path / mode
        summary = _run(shard[0], tiny_model_path, out, "--method", "fused", "--fuse", mode, "--coloc_stats",
                       str(out1))
        assert summary["counts"]["annotated"] == 24 and summary["options"]["fuse"] == mode
        assert all(_boxes(out).values())


def test_combine_fn_in_any_grouping(rng):
    fn = ColocCombineFn()
    maps = [(rng.uniform(0, 3, size=(4, 5, 6)), rng.normal(size=(2, 3))) for _ in range(9)]

    def combined(groups):
        accs = []
        for g in groups:
            acc = fn.create_accumulator()
            for m in g:
                acc = fn.add_input(acc, m)
            accs.append(acc)
        return fn.extract_output(fn.merge_accumulators([fn.create_accumulator()] + accs))

    one = combined([maps])
    for groups in ([maps[:2], maps[2:5], maps[5:]], [maps[i::3] for i in range(3)], [[m] for m in maps[::-1]]):
        other = combined(groups)
        assert (other.images, other.count) == (9, 9 * 20)
        np.testing.assert_allclose(other.outer, one.outer, rtol=1e-12)
        np.testing.assert_allclose(other.total, one.total, rtol=1e-12)
        np.testing.assert_allclose(other.cross, one.cross, rtol=1e-12)


def test_refuses_statistics_of_another_model_and_misplaced_flags(shard, tiny_model_path, coloc_run, tmp_path):
    out1, _ = coloc_run
    other = tmp_path / "other.keras"
    tiny_gap_model(seed=5).save(other)
    (tmp_path / "other.json").write_text(json.dumps({"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0,
                                                     "class_names": list(NAMES)}))
    with pytest.raises(OptionsError, match="made from other features .*model_sha256_16"):
        _run(shard[0], str(other), tmp_path / "o1", "--method", "coloc", "--coloc_stats", str(out1))
    with pytest.raises(OptionsError, match="--flip_tta|flip_tta"):
        _run(shard[0], tiny_model_path, tmp_path / "o2", "--method", "coloc", "--flip_tta", "--coloc_stats",
             str(out1))
    with pytest.raises(OptionsError, match="--coloc_stats goes with --method coloc"):
        _run(shard[0], tiny_model_path, tmp_path / "o3", "--coloc_stats", str(out1))
    with pytest.raises(OptionsError, match="no coloc_stats.json"):
        _run(shard[0], tiny_model_path, tmp_path / "o4", "--method", "coloc", "--coloc_stats", str(tmp_path))
    with pytest.raises(OptionsError, match="--tta_scales"):
        _run(shard[0], tiny_model_path, tmp_path / "o5", "--tta_scales", "1,x")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_multi_scale_averaging_matches_a_direct_computation(rng):
    import keras
    import tensorflow as tf

    model = tiny_gap_model(num_classes=3, seed=2)
    imgs = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    cm = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, scales=(1.0, 2.0), features=True)
    out = cm(imgs)
    x = imgs.astype(np.float32) / 255
    # Reference: the same layers on a 64x64 input (a model built for it), the 32x32 run resized to its grid.
    big_in = keras.Input((64, 64, 3))
    y = big_in
    for name in ("c1", "features"):
        y = model.get_layer(name)(y)
    f64 = keras.Model(big_in, y).predict(tf.image.resize(x, (64, 64)).numpy(), verbose=0)
    f32 = keras.Model(model.inputs, model.get_layer("features").output).predict(x, verbose=0)
    expected = (tf.image.resize(f32, (32, 32)).numpy() + f64) / 2
    assert out.features.shape == (3, 32, 32, 8)
    np.testing.assert_allclose(out.features, expected, atol=1e-5)
    w = model.get_layer("head").get_weights()[0]
    np.testing.assert_allclose(out.low_res[:, 0], np.einsum("bhwk,bk->bhw", expected, w[:, out.top_classes[:, 0]].T),
                               atol=1e-4)
    one = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)(imgs)
    assert not np.allclose(one.scores, out.scores)  # the scores are averaged over both scales too
    with pytest.raises(ValueError, match="scales"):
        cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, scales=(0.1,))


def test_finer_layer_statistics_are_numpys_pca_signed_by_the_cam(shard, tiny_model_path, coloc_run, tmp_path):
    """`--coloc_layer auto` on tiny_gap_model is c1 (32 x 32, twice the head's 16 x 16 grid): the statistics are
    those of c1's descriptors, each component signed so that its projection correlates positively with the class's
    CAM resized onto c1's grid; the maps and boxes are at that grid; stats of the head's features are refused."""
    import cv2
    import keras

    out = tmp_path / "fine"
    summary = _run(shard[0], tiny_model_path, out, "--method", "coloc", "--coloc_layer", "auto")
    assert summary["counts"]["annotated"] == 24 and summary["options"]["coloc_layer"] == "c1"
    loaded = read_stats(str(out), class_names=NAMES)
    man = json.loads((out / coloc.MANIFEST_FILE).read_text())
    assert man["extractor"]["coloc_layer"] == "c1" and man["extractor"]["channels"] == 8
    model = keras.models.load_model(tiny_model_path)
    two = keras.Model(model.inputs, [model.get_layer("c1").output, model.get_layer("features").output])
    pixels = [images.decode_image(r.encoded, (32, 32)).pixels
              for r in (records.parse_example(data) for _, data in records.iter_records(open(shard[0], "rb")))]
    fine, head = (a.astype(np.float16) for a in two.predict(np.stack(pixels).astype(np.float32) / 255, verbose=0))
    w = model.get_layer("head").get_weights()[0]
    for c in range(3):
        x = fine[c::3].reshape(-1, 8).astype(np.float64)
        vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
        comp = loaded.components[c]
        assert loaded.stats[c].count == 8 * 32 * 32
        assert abs(float(np.dot(comp.direction, vecs[:, -1]))) == pytest.approx(1.0, abs=1e-4)
        cams = np.stack([cv2.resize(np.einsum("hwk,k->hw", h.astype(np.float32), w[:, c]), (32, 32),
                                    interpolation=cv2.INTER_LINEAR) for h in head[c::3]]).reshape(-1)
        assert np.corrcoef((x - x.mean(0)) @ comp.direction, cams)[0, 1] > 0
    # Boxes differ from those of the head's features, and reusing the head's statistics is refused.
    assert _boxes(out) != _boxes(coloc_run[0])
    with pytest.raises(OptionsError, match="coloc_layer: file None, this run 'c1'"):
        _run(shard[0], tiny_model_path, tmp_path / "o1", "--method", "coloc", "--coloc_layer", "c1",
             "--coloc_stats", str(coloc_run[0]))
    with pytest.raises(OptionsError, match="--coloc_layer goes with --method coloc"):
        _run(shard[0], tiny_model_path, tmp_path / "o2", "--coloc_layer", "auto")
    with pytest.raises(OptionsError, match="'nope' is not a top-level layer"):
        _run(shard[0], tiny_model_path, tmp_path / "o3", "--method", "coloc", "--coloc_layer", "nope")
    with pytest.raises(OptionsError, match="'gap' gives shape"):
        _run(shard[0], tiny_model_path, tmp_path / "o4", "--method", "coloc", "--coloc_layer", "gap")


def test_layer_features_are_averaged_over_flip_and_scales_like_the_head_map(rng):
    import keras
    import tensorflow as tf

    model = tiny_gap_model(num_classes=3, seed=2)
    imgs = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    x = imgs.astype(np.float32) / 255
    c1 = keras.Model(model.inputs, model.get_layer("c1").output)
    flipped = c1.predict(x[:, :, ::-1], verbose=0)[:, :, ::-1]
    out = coloc.ColocModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, flip_tta=True,
                           coloc_layer="c1")(imgs)
    np.testing.assert_allclose(out.features, (c1.predict(x, verbose=0) + flipped) / 2, atol=1e-5)
    assert out.low_res.shape[2:] == (16, 16)  # the CAMs stay on the head's grid
    big_in = keras.Input((64, 64, 3))
    f64 = keras.Model(big_in, model.get_layer("c1")(big_in)).predict(tf.image.resize(x, (64, 64)).numpy(), verbose=0)
    multi = coloc.ColocModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, scales=(1.0, 2.0),
                             coloc_layer="c1")(imgs)
    expected = (tf.image.resize(c1.predict(x, verbose=0), (64, 64)).numpy() + f64) / 2
    np.testing.assert_allclose(multi.features, expected, atol=1e-5)
    with pytest.raises(ValueError, match="features=True"):
        cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, features_layer="c1")
