"""Small GAP classifiers and their training on image-level labels only.

`small_gap_cnn` keeps the final feature map at 1/4 of the input resolution (two poolings), which is what
localization needs on small images: a 64x64 input gives a 16x16 CAM.
"""
from __future__ import annotations

import logging
from typing import Sequence

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
        x = layers.ReLU(name=f"features" if i == 2 else f"relu{i}b")(x)
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
    """Train on uint8 images (N, H, W, 3) with integer labels; returns the final validation accuracy.

    Horizontal flips augment the data (a flipped shape is still the same class). Early stopping on the
    validation loss keeps the best weights.
    """
    import keras
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
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[stop], verbose=verbose, shuffle=False)
    return {"val_accuracy": float(max(hist.history["val_accuracy"])), "epochs": len(hist.history["loss"])}


def predict_classes(model, images: np.ndarray, prep: Preprocessing, batch_size: int = 128) -> np.ndarray:
    x = images.astype(np.float32) * prep.scale + prep.offset
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=1)


def class_names_or_default(names: Sequence[str] | None, n: int) -> tuple[str, ...]:
    return tuple(names) if names else tuple(f"class_{i}" for i in range(n))
