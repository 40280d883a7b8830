"""`--model keras:NAME`: keras.applications ImageNet classifiers, tested offline with random or local weights."""
import keras
import numpy as np
import pytest

from weakloc.models import cam, graph, images, synthetic, zoo
from weakloc.models.opening import ModelSpec
from weakloc.models.sidecar import Preprocessing
from weakloc.pipeline import label, results
from weakloc.pipeline.options import OptionsError

from tests.helpers import RUNNER


def test_imagenet_names_ship_with_the_package():
    names = zoo.imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    # Well-known ILSVRC-2012 indices (the order of sorted WordNet ids that every ImageNet model uses).
    assert (names[0], names[1], names[207], names[281], names[954], names[999]) == (
        "tench", "goldfish", "golden_retriever", "tabby", "banana", "toilet_tissue")
    assert {"crane_n02012849", "crane_n03126707"} <= set(names)  # the one lemma naming two synsets, told apart


@pytest.mark.parametrize("name, channels, finer, finer_channels", [
    ("MobileNetV2", 1280, "block_12_add", 96), ("ResNet50", 2048, "conv4_block6_add", 1024),
    ("EfficientNetB0", 1280, "block5c_add", 112)])
def test_applications_have_a_gap_head_that_cam_finds(name, channels, finer, finer_channels):
    model, prep = zoo.build(f"keras:{name}", weights=None)
    head = cam.find_gap_head(model)
    assert head.dense.name == "predictions" and head.output_activation == "softmax"
    assert tuple(head.feature.shape[1:]) == (7, 7, channels)
    # --coloc_layer auto: the residual stream at stride 16, not a wider expansion or padding after it.
    assert graph.finer_layer(model, head) == finer
    assert tuple(graph.layer_features(model, finer).shape[1:]) == (14, 14, finer_channels)
    assert prep.input_size == (224, 224) and (prep.scale, prep.offset) == (1.0, 0.0)
    assert prep.class_names == zoo.imagenet_class_names()


def test_preprocessing_is_inside_the_model():
    # ResNet50 wants BGR with the ImageNet means subtracted ("caffe"), not expressible as one scale and offset.
    ours, _ = zoo.build("keras:ResNet50", weights=None)
    plain = keras.applications.ResNet50(weights=None)
    plain.set_weights(ours.get_weights())
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    expected = plain.predict(keras.applications.resnet50.preprocess_input(x.copy()), verbose=0)
    np.testing.assert_allclose(ours.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-6)


def test_unknown_architecture_is_refused_with_the_list(tmp_path):
    with pytest.raises(zoo.ZooError, match="'MobileNetV9' is not in keras.applications.*MobileNetV2"):
        zoo.architecture("keras:MobileNetV9")


def test_failed_weight_download_says_what_to_do(monkeypatch, tmp_path):
    # What Keras raises offline, without touching the network (and whatever a cache holds).
    from keras.src.utils import file_utils

    def offline(fname, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(zoo.ZooError, match=r"ImageNet weights of MobileNetV2 .*Name or service not known.*"
                                           r"~/.keras/models.*--keras_weights"):
        zoo.build("keras:MobileNetV2")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    data = synthetic.make_shapes(3, size=64, seed=2)
    for i, img in enumerate(data.images):
        (folder / f"{i}.png").write_bytes(synthetic.encode_png(img))
    return folder, data


def test_label_with_keras_application_and_a_local_weights_file(pictures, tmp_path):
    folder, _ = pictures
    keras.utils.set_random_seed(4)
    plain = keras.applications.MobileNetV2(weights=None)
    weights = tmp_path / "mobilenet_v2.weights.h5"
    plain.save_weights(weights)
    out = tmp_path / "out"
    summary = label.run(["--input", str(folder / "*.png"), "--model", "keras:MobileNetV2", "--keras_weights",
                         str(weights), "--output", str(out), "--top_k", "3", f"--runner={RUNNER}"])
    assert summary["counts"]["annotated"] == 3 and summary["counts"]["balanced"]
    assert summary["model"]["input_size"] == [224, 224] and len(summary["model"]["class_names"]) == 1000
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    # Expected: the plain Keras model with the same weights on its own preprocessing of the same decoded pixels.
    names = zoo.imagenet_class_names()
    for i in range(3):
        pixels = images.decode_image((folder / f"{i}.png").read_bytes(), (224, 224)).pixels
        x = pixels[None].astype(np.float32)
        probs = plain.predict(keras.applications.mobilenet_v2.preprocess_input(x), verbose=0)[0]
        row = rows[str(folder / f"{i}.png")]
        top = np.argsort(-probs)[:3]
        assert [c["class_id"] for c in row["classes"]] == top.tolist()
        assert [c["label"] for c in row["classes"]] == [names[c] for c in top]
        np.testing.assert_allclose([c["score"] for c in row["classes"]], probs[top], rtol=1e-3)
        assert row["model"].startswith("keras:MobileNetV2@sha256:")
        assert len(row["boxes"]) == 3


def test_keras_application_on_dataflow_needs_no_model_path_but_a_remote_weights_file(pictures, tmp_path):
    folder, _ = pictures
    with pytest.raises(OptionsError, match=r"--keras_weights /tmp/w.weights.h5"):
        label.run(["--input", "gs://b/x/*.png", "--model", "keras:MobileNetV2", "--keras_weights",
                   "/tmp/w.weights.h5", "--output", "gs://b/out", "--runner=DataflowRunner"])


def test_keras_weights_without_a_keras_model_is_refused(tiny_model_path, tmp_path):
    with pytest.raises(OptionsError, match="--keras_weights goes with --model keras:NAME"):
        label.run(["--input", str(tmp_path / "*.png"), "--model", tiny_model_path, "--keras_weights", "none",
                   "--output", str(tmp_path / "out"), f"--runner={RUNNER}"])


def test_worker_refuses_a_weights_file_that_changed_since_launch(tmp_path):
    from weakloc.transforms import inference

    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"retrained since")
    prep = Preprocessing((224, 224), 1.0, 0.0, zoo.imagenet_class_names())
    spec = ModelSpec(path="keras:MobileNetV2", name="keras:MobileNetV2@sha256:" + "0" * 16, prep=prep,
                     fingerprint="0" * 16, keras_weights=str(weights))
    with pytest.raises(RuntimeError, match="w.weights.h5 changed since the job started"):
        inference.load_cam_model(spec, top_k=1)
