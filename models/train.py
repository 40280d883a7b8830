"""GAP classifiers and their training on image-level labels only.

`small_gap_cnn` keeps the final feature map at 1/4 of the input resolution (two poolings), which is what
localization needs on small images: a 64x64 input gives a 16x16 CAM. `cam_cnn` is the cheaper, wider-seeing
network `weakloc train --arch small` builds (a strided stem, then dilated convolutions at the final resolution so
the receptive field covers a whole object without pooling the map further). `backbone_gap` tops a
keras.applications network with GAP + Dense.
"""
from __future__ import annotations

import logging

import numpy as np

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

    def prep_fn(x, y, augment):
        x = tf.cast(x, tf.float32) * prep.scale + prep.offset
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
    return fit_datasets(model, train_ds, val_ds, epochs=epochs, verbose=verbose)


ARCHES = ("small", "mobilenetv2", "resnet50", "efficientnetb0")


class TrainError(ValueError):
    """Training cannot start as asked (e.g. pretrained weights that cannot be downloaded)."""


def cam_cnn(input_size: tuple[int, int], num_classes: int, *, width: int = 8, final_stride: int = 4,
            dilation: int = 1, seed: int = 0):
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
    out = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name="cam_cnn")


# keras.applications builders and the sidecar preprocessing each expects from uint8 RGB (x * scale + offset).
_BACKBONES = {
    "mobilenetv2": ("MobileNetV2", 1 / 127.5, -1.0),  # inputs in [-1, 1]
    "efficientnetb0": ("EfficientNetB0", 1.0, 0.0),  # rescales inside the model
    "resnet50": ("ResNet50", 1.0, 0.0),  # caffe BGR mean subtraction: added as a fixed 1x1 conv below
}


def backbone_gap(arch: str, input_size: tuple[int, int], num_classes: int, *, weights: str | None = "imagenet",
                 seed: int = 0):
    """A keras.applications backbone (include_top=False) -> GAP -> Dropout -> Dense(softmax).

    Returns (model, scale, offset) for the sidecar. Raises TrainError when ImageNet weights cannot be
    downloaded (offline), saying how to train from scratch instead.
    """
    import keras
    from keras import layers

    if arch not in _BACKBONES:
        raise TrainError(f"unknown backbone {arch!r}; expected one of {sorted(_BACKBONES)}")
    cls_name, scale, offset = _BACKBONES[arch]
    keras.utils.set_random_seed(seed)
    inp = keras.Input((*input_size, 3), name="image")
    x = inp
    if arch == "resnet50":
        # RGB -> BGR and ImageNet mean subtraction as a frozen 1x1 convolution: exact, and safe_mode loads it.
        mean_bgr = np.array([103.939, 116.779, 123.68], np.float32)
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        kernel[0, 0, [2, 1, 0], [0, 1, 2]] = 1.0
        x = layers.Conv2D(3, 1, trainable=False, name="caffe_preprocess",
                          kernel_initializer=keras.initializers.Constant(kernel),
                          bias_initializer=keras.initializers.Constant(-mean_bgr))(x)
    try:
        backbone = getattr(keras.applications, cls_name)(
            include_top=False, weights=weights, input_shape=(*input_size, 3)
        )
    except Exception as exc:
        if weights is None:
            raise
        raise TrainError(
            f"cannot get ImageNet weights for {cls_name} ({type(exc).__name__}: {exc}); this needs the internet "
            "(or the file in ~/.keras/models); pass --weights none to train from scratch"
        ) from None
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    out = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name=f"{arch}_gap"), scale, offset


def fit_datasets(model, train_ds, val_ds, *, epochs: int, patience: int = 2, learning_rate: float = 2e-3,
                 verbose: int = 2, steps_per_epoch: int | None = None) -> dict:
    """Fit on tf.data datasets of (float images, int labels) with early stopping on the validation loss.

    The learning rate follows a cosine decay over the planned epochs; the best weights (lowest validation loss)
    are restored. Returns {"val_accuracy", "epochs", "history"}.
    """
    import keras

    schedule = learning_rate
    if steps_per_epoch:
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, epochs * steps_per_epoch))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    callbacks = []
    if val_ds is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True))
    hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=verbose,
                     shuffle=False)  # the dataset shuffles itself
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    if val_ds is not None:
        best = int(np.argmin(h["val_loss"]))
        val_acc = h["val_accuracy"][best]
    else:
        val_acc = None
    return {"val_accuracy": val_acc, "epochs": len(h["loss"]), "history": h}
