"""CAM maths against a direct numpy formula, model discovery (plain, nested backbone, heads, refusal),
batch-size parity, no retrace on a short batch, save/reload parity."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from weakloc.models import cam, opening
from tests.helpers import tiny_gap_model


def _images(rng, n, size=(32, 32)):
    return rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _reference(model, feature_layer, dense_layer, images, scale, offset, classes):
    """CAM_c = sum_k w_kc f_k computed directly from the layer outputs and the kernel, then resized."""
    feat_model = keras.Model(model.inputs, model.get_layer(feature_layer).output)
    f = feat_model.predict(images.astype(np.float32) * scale + offset, verbose=0)  # (B, h, w, K)
    w = model.get_layer(dense_layer).get_weights()[0]  # (K, C)
    low = np.stack([np.stack([f[b] @ w[:, c] for c in classes[b]]) for b in range(len(images))])
    up = tf.image.resize(low.reshape(-1, *low.shape[2:], 1), images.shape[1:3], method="bilinear")
    return low, up.numpy().reshape(*low.shape[:2], *images.shape[1:3])


def test_cam_matches_direct_formula_and_scores_match_model(rng):
    model = tiny_gap_model(num_classes=4, seed=3)
    cm = cam.CamModel(model, input_size=(32, 32), scale=1 / 127.5, offset=-1.0, top_k=2)
    imgs = _images(rng, 5)
    extra = np.array([[3], [0], [-1], [2], [1]], np.int32)
    out = cm(imgs, extra)
    probs = model.predict(imgs.astype(np.float32) / 127.5 - 1.0, verbose=0)
    np.testing.assert_allclose(out.scores, probs, rtol=1e-4, atol=1e-6)
    order = np.argsort(-probs, axis=1)[:, :2]
    assert out.top_classes.tolist() == order.tolist()
    np.testing.assert_allclose(out.top_scores, np.take_along_axis(probs, order, 1), rtol=1e-4)
    classes = np.concatenate([order, np.maximum(extra, 0)], axis=1)
    assert out.cam_classes.tolist() == classes.tolist()
    low, up = _reference(model, "features", "head", imgs, 1 / 127.5, -1.0, classes)
    assert out.low_res.shape == (5, 3, 16, 16) and out.cams.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(out.low_res, low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.cams, up, rtol=1e-4, atol=1e-4)


def test_linear_head_gets_softmax_probabilities(rng):
    model = tiny_gap_model(num_classes=3, activation="linear", seed=4)
    cm = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)
    imgs = _images(rng, 3)
    logits = model.predict(imgs.astype(np.float32) / 255, verbose=0)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(cm(imgs).scores, expected, rtol=1e-4, atol=1e-6)
    assert cm.head.output_activation == "linear"


def test_separate_softmax_layer_after_linear_dense_is_found():
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, name="feat")(inp)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(3, name="logits")(x)
    out = layers.Softmax()(x)
    head = cam.find_gap_head(keras.Model(inp, out))
    assert head.dense.name == "logits" and head.output_activation == "softmax"


def test_nested_backbone_sequential_and_functional(tmp_path):
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3), alpha=0.35)
    seq = keras.Sequential([keras.Input((64, 64, 3)), backbone, layers.GlobalAveragePooling2D(),
                            layers.Dropout(0.3), layers.Dense(5, activation="softmax")])
    head = cam.find_gap_head(seq)
    assert tuple(head.feature.shape[1:]) == (2, 2, 1280)
    cm = cam.CamModel(seq, input_size=(64, 64), scale=1 / 127.5, offset=-1.0, top_k=5)
    out = cm(np.zeros((2, 64, 64, 3), np.uint8))
    assert out.cams.shape == (2, 5, 64, 64)
    # Reference: the backbone's own output weighed by the Dense kernel.
    f = backbone.predict(np.zeros((1, 64, 64, 3), np.float32) - 1.0, verbose=0)[0]
    w = seq.layers[-1].get_weights()[0]
    np.testing.assert_allclose(out.low_res[0], np.einsum("hwk,kc->chw", f, w)[out.cam_classes[0]], rtol=1e-3, atol=1e-4)
    # A reloaded Sequential calls its layers twice (build, then the rebuilt graph): still found, same maps.
    seq.save(tmp_path / "seq.keras")
    again = cam.CamModel(opening.load_keras_model(str(tmp_path / "seq.keras")), input_size=(64, 64), scale=1 / 127.5,
                         offset=-1.0, top_k=5)
    np.testing.assert_allclose(again(np.zeros((2, 64, 64, 3), np.uint8)).cams, out.cams, rtol=1e-4, atol=1e-5)
    # The same backbone in a functional model.
    inp = keras.Input((64, 64, 3))
    x = layers.GlobalAveragePooling2D()(backbone(inp))
    func = keras.Model(inp, layers.Dense(3, activation="softmax")(x))
    assert tuple(cam.find_gap_head(func).feature.shape[1:]) == (2, 2, 1280)


def test_refuses_a_model_without_gap_head():
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3)(inp)
    x = layers.Flatten(name="flat")(x)
    out = layers.Dense(2, activation="softmax")(x)
    with pytest.raises(cam.ModelStructureError, match="fed by Flatten.*expected GlobalAveragePooling2D"):
        cam.find_gap_head(keras.Model(inp, out))


def test_refuses_extra_dense_after_pooling():
    inp = keras.Input((16, 16, 3))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inp))
    x = layers.Dense(8, activation="relu", name="hidden")(x)
    out = layers.Dense(2, activation="softmax")(x)
    with pytest.raises(cam.ModelStructureError, match="fed by Dense"):
        cam.find_gap_head(keras.Model(inp, out))


def test_refuses_a_non_dense_output():
    inp = keras.Input((16, 16, 3))
    out = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inp))
    with pytest.raises(cam.ModelStructureError, match="found GlobalAveragePooling2D"):
        cam.find_gap_head(keras.Model(inp, out))


def test_named_layers_override_discovery(rng):
    model = tiny_gap_model(seed=5)
    auto = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)
    named = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, feature_layer="features",
                         dense_layer="head")
    imgs = _images(rng, 2)
    np.testing.assert_allclose(auto(imgs).cams, named(imgs).cams, rtol=1e-5, atol=1e-6)
    with pytest.raises(cam.ModelStructureError, match="must be 4-D"):
        cam.find_gap_head(model, feature_layer="gap", dense_layer="head")
    inp = keras.Input((16, 16, 3))
    a = layers.Conv2D(4, 3, name="a")(inp)
    b = layers.Conv2D(8, 3, name="b")(a)
    two = keras.Model(inp, layers.Dense(2, name="d")(layers.GlobalAveragePooling2D()(b)))
    with pytest.raises(cam.ModelStructureError, match="feature map has 4 channels but Dense 'd' expects 8"):
        cam.find_gap_head(two, feature_layer="a", dense_layer="d")
    with pytest.raises(cam.ModelStructureError, match="not a layer"):
        cam.find_gap_head(model, feature_layer="nope", dense_layer="head")


def test_batch_size_parity_and_no_retrace_on_short_batch(rng):
    model = tiny_gap_model(seed=6)
    cm = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    imgs = _images(rng, 7)
    whole = cm(imgs)
    parts = [cm(imgs[i : i + 3]) for i in range(0, 7, 3)]  # 3, 3, then a short batch of 1
    singles = [cm(imgs[i : i + 1]) for i in range(7)]
    assert cm.tracing_count == 1
    for split in (parts, singles):
        np.testing.assert_allclose(np.concatenate([p.cams for p in split]), whole.cams, rtol=1e-4, atol=1e-5)
        assert np.concatenate([p.top_classes for p in split]).tolist() == whole.top_classes.tolist()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])  # .h5: Keras 3's legacy format still loads
def test_save_reload_parity(tmp_path, rng, suffix):
    model = tiny_gap_model(seed=7)
    path = tmp_path / f"m{suffix}"
    model.save(path)
    reloaded = opening.load_keras_model(str(path))
    imgs = _images(rng, 3)
    a = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)(imgs)
    b = cam.CamModel(reloaded, input_size=(32, 32), scale=1 / 255, offset=0.0)(imgs)
    np.testing.assert_allclose(a.cams, b.cams, rtol=1e-5, atol=1e-6)


def test_lambda_model_refused_with_safe_mode(tmp_path):
    inp = keras.Input((16, 16, 3))
    x = layers.Lambda(lambda t: t * 2.0)(inp)
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(2, 3)(x))
    model = keras.Model(inp, layers.Dense(2)(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(cam.ModelStructureError, match="unsafe deserialization"):
        opening.load_keras_model(str(path))


def test_input_checks(rng):
    cm = cam.CamModel(tiny_gap_model(seed=8), input_size=(32, 32), scale=1 / 255, offset=0.0)
    with pytest.raises(ValueError, match="expected uint8 images of shape"):
        cm(np.zeros((1, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        cm(_images(rng, 1), np.array([[9]]))


def test_flip_tta_averages_the_cams_of_the_picture_and_its_mirror(rng):
    model = tiny_gap_model(num_classes=3, seed=5)
    plain = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=1)
    tta = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=1, flip_tta=True)
    imgs = _images(rng, 4)
    extra = np.array([[0], [1], [2], [1]], np.int32)
    a, b, t = plain(imgs, extra), plain(imgs[:, :, ::-1].copy(), extra), tta(imgs, extra)
    np.testing.assert_allclose(t.scores, (a.scores + b.scores) / 2, rtol=1e-4, atol=1e-6)
    # The requested class's map (column 1): mean of the map and the mirror's map flipped back.
    np.testing.assert_allclose(t.low_res[:, 1], (a.low_res[:, 1] + b.low_res[:, 1, :, ::-1]) / 2, rtol=1e-4,
                               atol=1e-5)


def test_finer_layer_refuses_a_model_without_a_finer_map():
    from weakloc.models import graph

    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, strides=4, padding="same", name="feat")(inp)  # 16 -> 4: no 8 x 8 map anywhere
    out = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    with pytest.raises(cam.ModelStructureError, match="no top-level layer has a 8 x 8 map"):
        graph.finer_layer(model, cam.find_gap_head(model))
