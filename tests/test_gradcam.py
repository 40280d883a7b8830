"""Grad-CAM against CAM where theory says they agree, on heads CAM cannot read, and through `weakloc label`."""
import keras
import numpy as np
import pytest
from keras import layers

from weakloc.models import cam, gradcam
from weakloc.pipeline import label, results

from tests.helpers import RUNNER, save_model, tiny_gap_model

TINY_FEATURE = 16  # tiny_gap_model: 32x32 input, one stride-2 conv


def _images(rng, n, size=(32, 32)):
    return rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _extra_dense_model(seed=7, hidden=8):
    """conv -> GAP -> Dense(relu) -> Dense(softmax): no CAM (the Dense kernel does not weigh the features)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="features")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(hidden, activation="relu", name="hidden")(x)
    return keras.Model(inp, layers.Dense(3, activation="softmax", name="head")(x))


@pytest.mark.parametrize("activation", ["softmax", "linear", "sigmoid"])
def test_gradcam_is_relu_cam_over_hw_on_a_gap_linear_head(rng, activation):
    # d logit_c / d f_k(i, j) = W[k, c] / (h w) for GAP + Dense, so Grad-CAM = ReLU(CAM) / (h w) exactly;
    # with softmax/sigmoid inside the Dense the gradient must be of the pre-activation logit for this to hold.
    model = tiny_gap_model(num_classes=4, activation=activation, seed=3)
    kw = dict(input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    imgs = _images(rng, 5)
    extra = np.array([[3], [0], [-1], [2], [1]], np.int32)
    ref = cam.CamModel(model, **kw)(imgs, extra)
    out = gradcam.GradCamModel(model, **kw)(imgs, extra)
    assert out.cam_classes.tolist() == ref.cam_classes.tolist()
    np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert (ref.low_res < 0).any() and (ref.low_res > 0).any(), "the check needs CAMs of both signs"
    hw = TINY_FEATURE * TINY_FEATURE
    np.testing.assert_allclose(out.low_res * hw, np.maximum(ref.low_res, 0), rtol=1e-4, atol=1e-5)
    # Max-normalised, the factor goes: the same map wherever CAM is positive. (Only at feature resolution: the
    # ReLU comes before upsampling in Grad-CAM, so upsampled maps differ near CAM's zero crossings.)
    np.testing.assert_allclose(out.low_res / out.low_res.max(axis=(2, 3), keepdims=True),
                               np.maximum(ref.low_res, 0) / ref.low_res.max(axis=(2, 3), keepdims=True), atol=1e-5)


def test_gradcam_on_extra_dense_head_matches_a_direct_gradient(rng):
    model = _extra_dense_model()
    with pytest.raises(cam.ModelStructureError, match="fed by Dense"):
        cam.find_gap_head(model)
    gm = gradcam.GradCamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    assert "features (Conv2D, features)" in gm.head.description
    imgs = _images(rng, 3)
    out = gm(imgs)
    # Independent reference, one image and one class at a time, through Keras's own two sub-models.
    import tensorflow as tf

    feat = keras.Model(model.inputs[0], model.get_layer("features").output)
    head_in = keras.Input((16, 16, 8))
    y = model.get_layer("hidden")(layers.GlobalAveragePooling2D()(head_in))
    w, b = model.get_layer("head").get_weights()
    for i in range(3):
        f = tf.constant(feat(imgs[i:i + 1].astype(np.float32) / 255))
        for m in range(2):
            c = int(out.cam_classes[i, m])
            with tf.GradientTape() as tape:
                tape.watch(f)
                logit = tf.matmul(keras.Model(head_in, y)(f), w[:, c:c + 1]) + b[c]
            g = tape.gradient(logit, f).numpy()[0]
            expected = np.maximum(np.einsum("hwk,k->hw", f.numpy()[0], g.mean(axis=(0, 1))), 0)
            np.testing.assert_allclose(out.low_res[i, m], expected, rtol=1e-4, atol=1e-6)


def test_gradcam_batch_parity_and_frozen_model(rng):
    model = _extra_dense_model(seed=8)
    model.trainable = False  # no watched variables: the tape must still record the head
    gm = gradcam.GradCamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)
    imgs = _images(rng, 4)
    whole = gm(imgs)
    ones = [gm(imgs[i:i + 1]) for i in range(4)]
    np.testing.assert_allclose(whole.low_res, np.concatenate([o.low_res for o in ones]), rtol=1e-4, atol=1e-6)
    assert whole.low_res.max() > 0
    assert gm.tracing_count == 1  # batch sizes 4 and 1 share one graph


def test_gradcam_walks_past_a_1x1_convolutional_head(rng):
    # MobileNetV3's head: GAP(keepdims) -> 1x1 conv -> Flatten -> Softmax; the 1x1 maps locate nothing.
    keras.utils.set_random_seed(2)
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="features")(inp)
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = layers.Conv2D(3, 1, name="logits")(x)
    model = keras.Model(inp, layers.Softmax()(layers.Flatten()(x)))
    gm = gradcam.GradCamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0)
    assert gm.head.description.endswith("features (Conv2D, features)")
    # The head is linear after GAP, so this too is ReLU(CAM)/(h w), with the 1x1 conv kernel as the Dense kernel.
    imgs = _images(rng, 2)
    out = gm(imgs)
    f = keras.Model(inp, model.get_layer("features").output)(imgs.astype(np.float32) / 255).numpy()
    w = model.get_layer("logits").get_weights()[0][0, 0]  # (6, 3)
    cam_c = np.stack([f[b] @ w[:, out.cam_classes[b, 0]] for b in range(2)])
    np.testing.assert_allclose(out.low_res[:, 0] * 16 * 16, np.maximum(cam_c, 0), rtol=1e-4, atol=1e-5)


def test_gradcam_refuses_a_model_without_feature_map():
    inp = keras.Input((8,))
    with pytest.raises(cam.ModelStructureError, match="no 4-D feature map"):
        gradcam.find_gradcam_head(keras.Model(inp, layers.Dense(2, activation="softmax")(inp)))
    image = keras.Input((16, 16, 3))
    flat = layers.Flatten()(image)  # a linear classifier on raw pixels: the only 4-D tensor is the image
    with pytest.raises(cam.ModelStructureError, match="the first 4-D tensor .* is the input image"):
        gradcam.find_gradcam_head(keras.Model(image, layers.Dense(2, activation="softmax")(flat)))


@pytest.fixture(scope="module")
def extra_dense_model_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("extra_dense")
    sidecar = {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "class_names": ["cat", "dog", "bird"]}
    return save_model(_extra_dense_model(), d, "extra_dense", sidecar)


def test_label_refuses_extra_dense_without_flag_and_boxes_it_with_gradcam(extra_dense_model_path, tmp_path):
    from weakloc.models import synthetic

    folder = tmp_path / "imgs"
    folder.mkdir()
    data = synthetic.make_shapes(4, size=40, seed=5)
    for i, img in enumerate(data.images):
        (folder / f"{i}.png").write_bytes(synthetic.encode_png(img))
    argv = ["--input", str(folder / "*.png"), "--model", extra_dense_model_path, f"--runner={RUNNER}"]
    with pytest.raises(cam.ModelStructureError, match="fed by Dense.*--method gradcam"):
        label.run([*argv, "--output", str(tmp_path / "refused")])
    summary = label.run([*argv, "--output", str(tmp_path / "out"), "--method", "gradcam", "--cam_threshold", "0.3"])
    rows = results.read_table(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 4 and summary["counts"]["balanced"] and summary["options"]["method"] == "gradcam"
    for row in rows:
        assert (row["width"], row["height"]) == (40, 40)
        # Random weights can give a class no positive evidence (all-zero map, no box); here each image has some.
        assert len(row["boxes"]) == 1
        box = row["boxes"][0]
        assert 0 <= box["xmin"] < box["xmax"] <= 40 and 0 <= box["ymin"] < box["ymax"] <= 40
        assert box["class_id"] == row["classes"][0]["class_id"]
