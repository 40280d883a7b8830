"""Fine-tuning a pretrained backbone from a user's file (issue 13), multi-label targets and train's reports (15).

Backbones here are tiny random networks saved to a temp dir (nothing is downloaded); each run is 1 epoch on
16x16..64x64 pictures. The real MobileNetV2 of ../shared/models is used only where it is present.
"""
import hashlib
import json
import pathlib

import numpy as np
import pytest

from weakloc.models import backbones, files, records, synthetic, train
from weakloc.pipeline import cli
from weakloc.pipeline import train as train_cmd

SHARED_MODELS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models"


def tiny_backbone_classifier(size=32, classes=7, seed=3):
    """conv -> conv (stride 2) -> conv 'top_conv' -> GAP -> Dense(softmax): a stand-in for an ImageNet file."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="mid")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="top_conv")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out)


def write_records(path, items, size=32):
    """items: (pixels uint8 (size, size, 3), [label texts]) -> one TFRecord file."""
    files.write_tfrecord_shards((records.make_example(synthetic.encode_png(img), source_id=f"img-{i:04d}",
                                                      label_texts=labels, width=size, height=size)
                                 for i, (img, labels) in enumerate(items)), [str(path)])
    return str(path)


def colour_set(n, size=32, seed=0, multi_every=0):
    """Red-dominated pictures are 'red', blue-dominated 'blue'; every `multi_every`-th holds both halves."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        if multi_every and i % multi_every == 0:
            img[:, : size // 2, 0] = 230
            img[:, size // 2:, 2] = 230
            items.append((img, ["blue", "red"]))
        else:
            c = i % 2
            img[..., 0 if c == 0 else 2] = 230
            items.append((img, ["red" if c == 0 else "blue"]))
    return items


def test_targets_follow_each_label_mode():
    # Two labels among three classes: split evenly (softmax), each on (sigmoid), first only (first).
    np.testing.assert_allclose(train.targets([2, 0], 3, "softmax"), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(train.targets([2, 0], 3, "sigmoid"), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(train.targets([2, 0], 3, "first"), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(train.targets([1, -1], 3, "softmax"), [0.0, 1.0, 0.0])  # unknown label ignored


def test_top1_hit_counts_any_label_of_the_image():
    y_true = np.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    y_pred = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]], np.float32)
    np.testing.assert_array_equal(np.asarray(train._top1_hit(y_true, y_pred)), [1.0, 0.0, 1.0])


def test_backbone_starts_from_the_files_weights(tmp_path):
    source = tiny_backbone_classifier()
    path = tmp_path / "mine.keras"
    source.save(path)
    (tmp_path / "mine.json").write_text(json.dumps({"scale": 1 / 128, "offset": -1.0}))
    args = train_cmd.parser().parse_args(["--input", "x", "--output", "o.keras", "--arch", "mobilenetv2",
                                          "--weights", str(path)])
    model, bb, size, scale, offset = train_cmd.build_backbone_model(args, None, 2, "softmax")
    # Cut at the GAP input of the file's classifier; every backbone weight is the file's, before any training.
    assert bb.feature_layer == "top_conv" and size == (32, 32) and (scale, offset) == (1 / 128, -1.0)
    for name in ("stem", "mid", "top_conv"):
        for mine, theirs in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    assert bb.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert model.output.shape[-1] == 2 and model.get_layer("gap").input.shape[1:3] == (16, 16)
    # A larger input re-builds the same graph with the same weights: a finer map, the same numbers per layer.
    args.input_size = "48,48"
    model48, *_ = train_cmd.build_backbone_model(args, (48, 48), 2, "softmax")
    assert model48.get_layer("gap").input.shape[1:3] == (24, 24)
    np.testing.assert_array_equal(model48.get_layer("top_conv").get_weights()[0],
                                  source.get_layer("top_conv").get_weights()[0])


def test_train_fine_tunes_a_saved_backbone_end_to_end(tmp_path, capsys):
    source = tiny_backbone_classifier()
    path = tmp_path / "mine.keras"
    source.save(path)
    data = write_records(tmp_path / "train.tfrecord", colour_set(48, multi_every=4))
    out = tmp_path / "m" / "ft.keras"
    assert cli.main(["train", "--input", data, "--output", str(out), "--arch", "mobilenetv2", "--weights",
                     str(path), "--head_epochs", "1", "--epochs", "1", "--batch_size", "16",
                     "--val_percent", "25"]) == 0
    printed = capsys.readouterr().out
    side = json.loads((tmp_path / "m" / "ft.json").read_text())
    t = side["training"]
    # Both phases ran; the backbone's origin is on record (name + content hash); counts add up to the data.
    assert [p["name"] for p in t["phases"]] == ["head", "fine_tune"] and t["epochs_run"] == 2
    assert t["backbone"]["file"] == str(path)
    assert t["backbone"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    counts = t["label_counts"]
    assert counts["train"]["images"] + counts["validation"]["images"] == 48
    assert sum(c["multi_label"] for c in counts.values()) == 12
    # i % 4 == 0 (12 pictures) holds both; of the other 36, even i (12) are red, odd i (24) blue; a two-label
    # picture counts once for each of its classes.
    assert {n: counts["train"]["per_class"][n] + counts["validation"]["per_class"][n] for n in ("red", "blue")} \
        == {"red": 12 + 12, "blue": 24 + 12}
    assert "red" in printed and "12 with several labels" in printed
    assert side["input_size"] == [32, 32] and side["class_names"] == ["blue", "red"]


def test_train_refuses_a_file_without_a_feature_map(tmp_path, capsys):
    import keras

    inp = keras.Input((16, 16, 3))
    flat = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inp)))
    path = tmp_path / "flat.keras"
    flat.save(path)
    data = write_records(tmp_path / "t.tfrecord", colour_set(8, size=16), size=16)
    assert cli.main(["train", "--input", data, "--output", str(tmp_path / "o.keras"), "--arch", "mobilenetv2",
                     "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no usable feature map" in err and "Traceback" not in err
    assert not (tmp_path / "o.keras").exists()
    # Not a Keras file at all: one line as well.
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    assert cli.main(["train", "--input", data, "--output", str(tmp_path / "o.keras"), "--arch", "mobilenetv2",
                     "--weights", str(bad)]) == 2
    assert "not a readable Keras model" in capsys.readouterr().err


def test_weights_h5_loads_into_the_named_architecture(tmp_path):
    import keras

    keras.utils.set_random_seed(5)
    src = keras.applications.MobileNetV2(include_top=False, weights=None)
    path = tmp_path / "mnv2.weights.h5"
    src.save_weights(path)
    bb = backbones.load(str(path), str(path), "mobilenetv2")
    assert bb.provenance["kind"] == "weights" and bb.feature_layer == "out_relu"
    for name in ("Conv1", "block_13_depthwise", "Conv_1"):
        np.testing.assert_array_equal(bb.model.get_layer(name).get_weights()[0], src.get_layer(name).get_weights()[0])
    with pytest.raises(backbones.BackboneError, match="fit no ResNet50"):
        backbones.load(str(path), str(path), "resnet50")


def test_last_stride_one_doubles_the_map_with_the_same_weights():
    import keras

    keras.utils.set_random_seed(6)
    src = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    fine = backbones.rebuild(src, last_stride_arch="mobilenetv2")
    assert src.output.shape[1:3] == (2, 2) and fine.output.shape[1:3] == (4, 4)
    assert fine.get_layer("block_13_depthwise").strides == (1, 1)
    assert fine.get_layer("block_14_depthwise").dilation_rate == (2, 2)
    np.testing.assert_array_equal(fine.get_layer("Conv_1").get_weights()[0], src.get_layer("Conv_1").get_weights()[0])
    # Up to the changed layer both networks compute the same thing.
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    a = keras.Model(src.input, src.get_layer("block_13_expand_relu").output)(x)
    b = keras.Model(fine.input, fine.get_layer("block_13_expand_relu").output)(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Stride 2 at the same place: the stride-1 map, sampled every other pixel, equals the strided output of the
    # first block (before dilation starts to matter).
    a13 = np.asarray(keras.Model(src.input, src.get_layer("block_13_depthwise").output)(x))
    b13 = np.asarray(keras.Model(fine.input, fine.get_layer("block_13_depthwise").output)(x))
    np.testing.assert_allclose(b13[:, 1::2, 1::2], a13, rtol=1e-4, atol=1e-4)


def test_multi_label_sigmoid_training_learns_both_labels(tmp_path):
    data = write_records(tmp_path / "c.tfrecord", colour_set(96, size=16, seed=1, multi_every=3), size=16)
    out = tmp_path / "ml.keras"
    assert cli.main(["train", "--input", data, "--output", str(out), "--input_size", "16,16", "--epochs", "3",
                     "--width", "4", "--batch_size", "16", "--multi_label", "sigmoid", "--learning_rate", "0.01"]) == 0
    from weakloc.models import graph, opening

    model = opening.load_keras_model(str(out))
    assert graph.find_gap_head(model).output_activation == "sigmoid"
    both = np.stack([img for img, labs in colour_set(12, size=16, seed=9, multi_every=1)])
    red = np.stack([img for img, labs in colour_set(12, size=16, seed=9) if labs == ["red"]])
    p_both = model.predict(both.astype(np.float32) / 255, verbose=0)
    p_red = model.predict(red.astype(np.float32) / 255, verbose=0)
    # Classes in sorted order: blue, red. A two-colour picture scores 'blue' far above a red-only one.
    assert p_both[:, 0].mean() > p_red[:, 0].mean() + 0.2


@pytest.mark.slow
def test_shared_mobilenetv2_loads_as_a_backbone():
    path = SHARED_MODELS / "mobilenet_v2_imagenet.keras"
    if not path.exists():
        pytest.skip("needs ../shared/models/mobilenet_v2_imagenet.keras (absent in a plain clone)")
    side = json.loads((SHARED_MODELS / "mobilenet_v2_imagenet.json").read_text())
    bb = backbones.load(str(path), str(path), "mobilenetv2", sidecar=side)
    assert bb.feature_layer == "out_relu" and bb.provenance["feature_map"] == [7, 7, 1280]
    assert (bb.scale, bb.offset) == (1 / 128, -1.0)
    cut = backbones.load(str(path), str(path), "mobilenetv2", feature_layer="block_13_expand_relu")
    assert cut.provenance["feature_map"] == [14, 14, 576]


def test_train_on_labels_that_carry_no_signal_warns_it_stopped_early_and_is_low(tmp_path, caplog, recwarn):
    """Labels drawn at random, independent of the noise pictures: nothing generalises, so validation loss stops
    improving (a high learning rate overfits the training noise) and validation accuracy stays near a guess.
    train must say both, and Keras's per-epoch "ran out of data" warning must not reach the user."""
    rng = np.random.default_rng(5)
    names = ["a", "b", "c"]
    items = [(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), [names[rng.integers(3)]]) for _ in range(96)]
    data = write_records(tmp_path / "noise.tfrecord", items, size=16)
    out = tmp_path / "noise.keras"
    assert cli.main(["train", "--input", data, "--output", str(out), "--input_size", "16,16", "--epochs", "15",
                     "--patience", "1", "--width", "4", "--batch_size", "16", "--learning_rate", "0.05",
                     "--val_percent", "30"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    err = "\n".join(warned)
    t = json.loads((tmp_path / "noise.json").read_text())["training"]
    assert t["epochs_run"] < 15, "a run on random labels trained its whole budget"
    assert "training stopped early: no validation-loss progress for 1 epochs" in err
    assert "raise --patience to train longer" in err
    assert "validation accuracy is low" in err
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]


def test_flip_augment_flips_the_same_pictures_on_every_run(tmp_path):
    """--flip_augment mirrors about half the pictures, different ones each epoch, and the same ones on every run
    (a random flip inside a parallel map used to follow thread order, so two runs trained on different data)."""
    from weakloc.pipeline import inputs

    rng = np.random.default_rng(2)
    items = [(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), ["a" if i % 2 else "b"]) for i in range(48)]
    data = write_records(tmp_path / "f.tfrecord", items, size=8)
    source = inputs.scan([data])

    def two_epochs():
        ds = train_cmd.make_dataset(source, input_size=(8, 8), scale=1.0, offset=0.0, label_offset=0,
                                    validation=False, val_percent=10, batch_size=4, label_mode="softmax", flip=True)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    first, again = two_epochs(), two_epochs()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # the training split in stream order, unflipped, as the pipeline reads it
    originals = np.stack([ex.pixels for ex in inputs.iterate(source, input_size=(8, 8))
                          if not inputs.in_validation(ex.image_id, 10)]).astype(np.float32)
    flipped = []
    for epoch in first:
        assert epoch.shape == originals.shape
        same = np.all(epoch == originals, axis=(1, 2, 3))
        mirrored = np.all(epoch == originals[:, :, ::-1], axis=(1, 2, 3))
        assert np.all(same | mirrored)  # each output is its own picture, mirrored or not
        flipped.append(mirrored)
    assert 0.2 < np.mean(flipped[0]) < 0.8 and not np.array_equal(flipped[0], flipped[1])

def bn_backbone_classifier(size=32, classes=5, seed=4):
    """stem conv -> BatchNorm (moved statistics) -> conv (stride 2) -> conv -> GAP -> Dense: a trunk with BN."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="mid")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="top_conv")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inp, layers.Dense(classes, activation="softmax", name="predictions")(x))
    bn = model.get_layer("stem_bn")
    gamma, beta, _, _ = bn.get_weights()
    rng = np.random.default_rng(seed)
    bn.set_weights([gamma, beta, rng.normal(0.3, 0.1, 8).astype(np.float32),
                    rng.uniform(0.5, 2.0, 8).astype(np.float32)])
    return model


def test_feature_cache_trunk_and_top_compose_to_the_whole_model():
    from weakloc.models import feature_cache

    model = bn_backbone_classifier()
    trunk, top = feature_cache.split(model, "mid")
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    import keras

    # The cached tensor is the input of the first unfrozen layer, computed in inference mode (BN's moving stats).
    reference = keras.Model(model.inputs, model.get_layer("stem_bn").output)
    np.testing.assert_allclose(np.asarray(trunk(x)), np.asarray(reference(x, training=False)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(top(trunk(x))), np.asarray(model(x)), atol=1e-6)
    # Flip caching: the mirror image's features are the trunk's on the mirrored picture (a conv trunk: mirrored).
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]])).batch(4)
    feats, ys = feature_cache.cache_features(trunk, ds, flip=True)
    assert feats.shape == (12, 32, 32, 8) and ys.shape == (12, 5)
    np.testing.assert_allclose(feats[4:8], np.asarray(trunk(x[:4, :, ::-1])), atol=1e-6)
    np.testing.assert_array_equal(ys[:4], ys[4:8])
    # Top layers share the model's own weights: a change to one is a change to the other.
    assert top.get_layer("top_conv") is model.get_layer("top_conv")


def test_feature_cache_refuses_a_cut_that_a_skip_connection_crosses():
    import keras
    from keras import layers

    from weakloc.models import feature_cache

    inp = keras.Input((16, 16, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inp)
    b = layers.Conv2D(4, 3, padding="same", name="b")(a)
    c = layers.Conv2D(4, 3, padding="same", name="c")(b)
    model = keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling2D()(layers.Add(name="skip")([a, c]))))
    # Cut at c's input: the skip reads a, below the cut, which no cached tensor holds.
    with pytest.raises(feature_cache.FeatureCacheError, match="--no_feature_cache"):
        feature_cache.split(model, "c")
    # Cut at b's input (a's output): the skip starts at the cut itself, which the cache holds.
    trunk, top = feature_cache.split(model, "b")
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(top(trunk(x))), np.asarray(model(x)), atol=1e-6)


def test_train_on_cached_features_saves_a_whole_model_with_frozen_trunk_unchanged(tmp_path):
    import keras

    source = bn_backbone_classifier()
    path = tmp_path / "mine.keras"
    source.save(path)
    data = write_records(tmp_path / "train.tfrecord", colour_set(48))
    out = tmp_path / "ft.keras"
    assert cli.main(["train", "--input", data, "--output", str(out), "--arch", "mobilenetv2", "--weights",
                     str(path), "--head_epochs", "2", "--epochs", "2", "--batch_size", "16", "--flip_augment",
                     "--val_percent", "25"]) == 0
    doc = json.loads((tmp_path / "ft.json").read_text())
    side = doc["training"]
    assert side["feature_cache"] is True and [p["name"] for p in side["phases"]] == ["head", "fine_tune"]
    model = keras.models.load_model(out, safe_mode=True)
    # The frozen trunk (stem conv and its BatchNorm, moving statistics included) is the file's, exactly; the
    # unfrozen top moved.
    for name in ("stem", "stem_bn"):
        for mine, theirs in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    assert not np.array_equal(model.get_layer("top_conv").get_weights()[0],
                              source.get_layer("top_conv").get_weights()[0])
    # The saved whole model computes what the trained top computes on the cached trunk tensor.
    from weakloc.models import feature_cache

    x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    trunk, top = feature_cache.split(model, "mid")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(top(trunk(x))), atol=1e-6)
    # --no_feature_cache trains the old way and says so in the sidecar.
    out2 = tmp_path / "plain.keras"
    assert cli.main(["train", "--input", data, "--output", str(out2), "--arch", "mobilenetv2", "--weights",
                     str(path), "--head_epochs", "1", "--epochs", "1", "--batch_size", "16", "--val_percent", "25",
                     "--no_feature_cache"]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["training"]["feature_cache"] is False


def test_one_step_on_cached_features_equals_one_step_through_the_whole_model():
    import keras

    from weakloc.models import feature_cache

    x = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(np.float32)
    y = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0, 1, 2]]
    whole, cached = bn_backbone_classifier(), bn_backbone_classifier()  # the same seed: the same weights
    for m in (whole, cached):
        for layer in m.layers:
            layer.trainable = layer.name in ("mid", "top_conv", "predictions")
    whole.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    whole.train_on_batch(x, y)
    trunk, top = feature_cache.split(cached, "mid")
    top.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    top.train_on_batch(np.asarray(trunk(x)), y)
    # The cached step moved the whole model's own layers exactly as the uncached step did.
    np.testing.assert_allclose(np.asarray(cached(x)), np.asarray(whole(x)), atol=1e-5)
    for name in ("stem", "stem_bn", "mid", "top_conv"):
        for a, b in zip(cached.get_layer(name).get_weights(), whole.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(whole.get_layer("mid").get_weights()[0],
                           bn_backbone_classifier().get_layer("mid").get_weights()[0])
