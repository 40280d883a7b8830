"""GAP classifiers and their training on image-level labels only.

`small_gap_cnn` keeps the final feature map at 1/4 of the input resolution (two poolings), which is what
localization needs on small images: a 64x64 input gives a 16x16 CAM. `cam_cnn` is the cheaper, wider-seeing
network `weakloc train --arch small` builds (a strided stem, then dilated convolutions at the final resolution so
the receptive field covers a whole object without pooling the map further). `gap_classifier` tops a
pretrained backbone (models/backbones.py, or `imagenet_backbone`) with GAP + Dense, and `fine_tune` trains it
in the usual two phases.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np

from . import backbones
from .sidecar import Preprocessing

logger = logging.getLogger(__name__)


def small_gap_cnn(input_size: tuple[int, int], num_classes: int, *, width: int = 16, seed: int = 0):
    """conv features (stride 4) -> GlobalAveragePooling2D -> Dense(softmax), for `x * 1/255` inputs."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((*input_size, 3), name="image")
    x = inp
    for i, mult in enumerate((1, 2, 4)):
        x = layers.Conv2D(width * mult, 3, padding="same", use_bias=False, name=f"conv{i}a")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}a")(x)
        x = layers.ReLU(name=f"relu{i}a")(x)
        x = layers.Conv2D(width * mult, 3, padding="same", use_bias=False, name=f"conv{i}b")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}b")(x)
        x = layers.ReLU(name="features" if i == 2 else f"relu{i}b")(x)
        if i < 2:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    out = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name="small_gap_cnn")


def fit_in_memory(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    prep: Preprocessing,
    epochs: int = 6,
    batch_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    verbose: int = 0,
) -> dict:
    """Train on uint8 images (N, H, W, 3) with integer labels, through `fit_datasets` (early stopping, best
    weights restored); returns its {"val_accuracy" (of the kept weights), "epochs", "history"}.

    Horizontal flips augment the data (a flipped shape is still the same class).
    """
    import tensorflow as tf

    n = len(images)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, int(n * val_fraction))
    val_idx, tr_idx = order[:n_val], order[n_val:]

    num_classes = int(model.outputs[0].shape[-1])

    def prep_fn(x, y, augment):
        x = tf.cast(x, tf.float32) * prep.scale + prep.offset
        y = tf.one_hot(y, num_classes)
        if augment:
            x = tf.image.random_flip_left_right(x, seed=seed)
        return x, y

    train_ds = (
        tf.data.Dataset.from_tensor_slices((images[tr_idx], labels[tr_idx]))
        .shuffle(len(tr_idx), seed=seed)
        .batch(batch_size)
        .map(lambda x, y: prep_fn(x, y, True))
        .prefetch(2)
    )
    val_ds = (
        tf.data.Dataset.from_tensor_slices((images[val_idx], labels[val_idx]))
        .batch(batch_size)
        .map(lambda x, y: prep_fn(x, y, False))
    )
    return fit_datasets(model, train_ds, val_ds, epochs=epochs, patience=2, verbose=verbose)


ARCHES = ("small", "mobilenetv2", "resnet50", "efficientnetb0")


class TrainError(ValueError):
    """Training cannot start as asked (e.g. pretrained weights that cannot be downloaded)."""


def cam_cnn(input_size: tuple[int, int], num_classes: int, *, width: int = 8, final_stride: int = 4,
            dilation: int = 1, seed: int = 0, activation: str = "softmax"):
    """conv stem (stride 2) -> conv -> [pool] -> 3 convs -> GAP -> Dropout -> Dense(softmax).

    The final feature map is input / `final_stride` (2 or 4): 24x24 for a 96x96 input at stride 4. For inputs
    scaled `x * 1/255`. Channels: 2, 3, 6, 6, 8 x `width`; at width 8 a 96x96 image costs about 45 M
    multiply-adds, sized for CPU training in minutes. `dilation` > 1 dilates the last two convolutions (a wider
    receptive field: 33 px at 1, 65 px at 2 and 4, stride 4); measured on cluttered MNIST it blurs the CAMs
    into boxes about twice too large (BENCHMARKS.md), so the default is 1.
    """
    import keras
    from keras import layers

    if final_stride not in (2, 4):
        raise TrainError(f"final_stride must be 2 or 4, got {final_stride}")
    keras.utils.set_random_seed(seed)

    def conv(x, filters, name, dilation=1, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
                          name=name)(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inp = keras.Input((*input_size, 3), name="image")
    x = conv(inp, 2 * width, "stem", strides=2)
    x = conv(x, 3 * width, "conv1")
    if final_stride == 4:
        x = layers.MaxPooling2D(2, name="pool1")(x)
    x = conv(x, 6 * width, "conv2")
    x = conv(x, 6 * width, "conv3", dilation=dilation)
    x = conv(x, 8 * width, "features", dilation=2 * dilation if dilation > 1 else 1)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    out = layers.Dense(num_classes, activation=activation, name="classifier")(x)
    return keras.Model(inp, out, name="cam_cnn")


def imagenet_backbone(arch: str, input_size: tuple[int, int], *, weights: str | None = "imagenet"):
    """A keras.applications backbone (include_top=False) at `input_size`: `--weights imagenet` (Keras downloads
    the file once into ~/.keras/models) or random weights (`none`). Returns a backbones.Backbone.

    Raises TrainError when ImageNet weights cannot be downloaded (offline), saying what to do instead.
    """
    import keras

    if arch not in backbones.APPLICATIONS:
        raise TrainError(f"unknown backbone {arch!r}; expected one of {sorted(backbones.APPLICATIONS)}")
    cls_name, scale, offset = backbones.APPLICATIONS[arch]
    try:
        model = getattr(keras.applications, cls_name)(include_top=False, weights=weights,
                                                      input_shape=(*input_size, 3))
    except Exception as exc:
        if weights is None:
            raise
        raise TrainError(
            f"cannot get ImageNet weights for {cls_name} ({type(exc).__name__}: {exc}); this needs the internet "
            "(or the file in ~/.keras/models); pass --weights FILE with a local .keras/.h5/.weights.h5 backbone, "
            "or --weights none to train from scratch"
        ) from None
    feature = model.outputs[0]
    provenance = {"file": weights or "none", "kind": "keras.applications",
                  "feature_layer": feature._keras_history.operation.name,
                  "feature_map": [int(d) for d in feature.shape[1:]]}
    return backbones.Backbone(model, provenance["feature_layer"], provenance, scale, offset)


def gap_classifier(backbone, num_classes: int, *, arch: str, activation: str = "softmax", caffe: bool = False,
                   seed: int = 0):
    """backbone feature map -> GAP -> Dropout -> Dense(`activation`), flat on the backbone's own input.

    `caffe` puts ResNet's RGB -> BGR and ImageNet mean subtraction in front as a frozen 1x1 convolution (exact,
    and safe_mode loads it); the backbone is then called as a nested model.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    if caffe:
        inp = keras.Input(tuple(backbone.input.shape[1:]), name="image")
        mean_bgr = np.array([103.939, 116.779, 123.68], np.float32)
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        kernel[0, 0, [2, 1, 0], [0, 1, 2]] = 1.0
        x = layers.Conv2D(3, 1, trainable=False, name="caffe_preprocess",
                          kernel_initializer=keras.initializers.Constant(kernel),
                          bias_initializer=keras.initializers.Constant(-mean_bgr))(inp)
        x = backbone(x)
    else:
        inp, x = backbone.inputs[0], backbone.outputs[0]
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    out = layers.Dense(num_classes, activation=activation, name="classifier")(x)
    return keras.Model(inp, out, name=f"{arch}_gap")


# How labels become targets (`--multi_label`). "softmax": k-hot targets normalised to sum 1 under a softmax and
# cross-entropy (Mahajan et al., "Exploring the Limits of Weakly Supervised Pretraining", ECCV 2018); a
# single-label image gets its one-hot vector, so this is plain softmax training there. "sigmoid": k-hot targets,
# one sigmoid per class, binary cross-entropy. "first": one-hot of the first label (what weakloc did before).
LABEL_MODES = ("softmax", "sigmoid", "first")


def targets(label_ids, num_classes: int, mode: str) -> np.ndarray:
    """float32 (num_classes,) training target of one image's known class ids (see LABEL_MODES)."""
    y = np.zeros(num_classes, np.float32)
    ids = sorted(set(int(c) for c in label_ids if c >= 0))
    if not ids:
        return y
    if mode == "first":
        ids = ids[:1]
    y[ids] = 1.0
    if mode != "sigmoid":
        y /= len(ids)
    return y


def _top1_hit(y_true, y_pred):
    """1 where the top-scoring class is one of the image's labels (top-1 accuracy, multi-label aware)."""
    import tensorflow as tf

    top = tf.argmax(y_pred, axis=-1)
    return tf.cast(tf.gather(y_true, top, axis=-1, batch_dims=1) > 0, tf.float32)


def _early_stopped(history: dict, patience: int, epochs: int) -> bool:
    return len(history["loss"]) < epochs and len(history.get("val_loss", ())) > patience


def fit_datasets(model, train_ds, val_ds, *, epochs: int, patience: int = 5, learning_rate: float = 2e-3,
                 verbose: int = 2, steps_per_epoch: int | None = None, label_mode: str = "softmax",
                 initial_epoch: int = 0) -> dict:
    """Fit on tf.data datasets of (float images, float32 (C,) targets from `targets`) with early stopping on
    the validation loss.

    The learning rate follows a cosine decay over the planned epochs; the best weights (lowest validation loss)
    are restored. "accuracy" is top-1 accuracy: the top class is one of the image's labels. Returns
    {"val_accuracy" (of the kept weights), "epochs", "history", "early_stopped", "best_epoch"}.
    """
    import keras

    schedule = learning_rate
    if steps_per_epoch:
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
    loss = "binary_crossentropy" if label_mode == "sigmoid" else "categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss,
                  metrics=[keras.metrics.MeanMetricWrapper(_top1_hit, name="accuracy")])
    callbacks = []
    if val_ds is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True))
    with warnings.catch_warnings():
        # A streamed dataset of unknown length ends each epoch by running out: Keras warns every epoch.
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        hist = model.fit(train_ds, validation_data=val_ds, epochs=initial_epoch + epochs, callbacks=callbacks,
                         verbose=verbose, shuffle=False, initial_epoch=initial_epoch)  # the dataset shuffles
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    best = int(np.argmin(h["val_loss"])) if val_ds is not None else len(h["loss"]) - 1
    return {"val_accuracy": h["val_accuracy"][best] if val_ds is not None else None, "epochs": len(h["loss"]),
            "history": h, "best_epoch": initial_epoch + best + 1,
            "early_stopped": val_ds is not None and _early_stopped(h, patience, epochs)}


def fine_tune(model, backbone_model, top, train_ds, val_ds, *, head_epochs: int, epochs: int, patience: int,
              learning_rate: float, fine_tune_learning_rate: float, verbose: int = 2,
              steps_per_epoch: int | None = None, label_mode: str = "softmax") -> dict:
    """The transfer-learning schedule: the new head alone on the frozen backbone, then `top` (layers of the
    backbone) unfrozen at the lower `fine_tune_learning_rate`, each phase with early stopping on validation.

    Returns fit_datasets' result for the last phase with "phases" [{"name", "epochs", "val_accuracy", ...}] and the
    history of both phases joined.
    """
    phases = []
    backbone_model.trainable = True
    for layer in backbone_model.layers:
        layer.trainable = False
    logger.info("phase 1: new head on the frozen backbone, up to %d epochs at learning rate %g", head_epochs,
                learning_rate)
    first = fit_datasets(model, train_ds, val_ds, epochs=head_epochs, patience=patience,
                         learning_rate=learning_rate, verbose=verbose, steps_per_epoch=steps_per_epoch,
                         label_mode=label_mode)
    phases.append(dict(name="head", epochs=first["epochs"], val_accuracy=first["val_accuracy"],
                       learning_rate=learning_rate, early_stopped=first["early_stopped"]))
    if not top or epochs < 1:
        return dict(first, phases=phases)
    for layer in top:
        layer.trainable = True
    logger.info("phase 2: %d backbone layers from %s unfrozen, up to %d epochs at learning rate %g", len(top),
                top[0].name, epochs, fine_tune_learning_rate)
    second = fit_datasets(model, train_ds, val_ds, epochs=epochs, patience=patience,
                          learning_rate=fine_tune_learning_rate, verbose=verbose, steps_per_epoch=steps_per_epoch,
                          label_mode=label_mode, initial_epoch=first["epochs"])
    phases.append(dict(name="fine_tune", epochs=second["epochs"], val_accuracy=second["val_accuracy"],
                       learning_rate=fine_tune_learning_rate, unfrozen_from=top[0].name, unfrozen_layers=len(top),
                       early_stopped=second["early_stopped"]))
    history = {k: first["history"].get(k, []) + v for k, v in second["history"].items()}
    return dict(second, epochs=first["epochs"] + second["epochs"], history=history, phases=phases)
