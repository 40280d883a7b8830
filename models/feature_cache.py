"""Fine-tuning on cached frozen-trunk features: the frozen lower part of a backbone runs once, not every epoch.

Both phases of `train.fine_tune` leave every layer below the first unfrozen one frozen, so its output never
changes during training. `split` cuts a GAP classifier at that layer's input into a trunk (image -> tensor) and
a top (tensor -> class scores) that share the classifier's own layers; `cache_features` runs the trunk once over
the images (and their mirror images for flip augmentation); training the top on the cache trains the very layers
of the full model, which is then saved exactly as before.
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class FeatureCacheError(ValueError):
    """The classifier cannot be cut at the first unfrozen layer (a skip connection crosses the cut)."""


def split(model, first_unfrozen: str):
    """(trunk, top) of `model` cut at the input of layer `first_unfrozen`.

    trunk: image (None, H, W, 3) -> float (None, h, w, c), the input tensor of `first_unfrozen`; top: that tensor
    -> the model's output. Both are functional models over `model`'s own layer objects (weights shared, not
    copied). Raises FeatureCacheError when the top needs another tensor of the trunk (a residual branch that
    starts below the cut), since then the cached tensor alone cannot feed it.
    """
    import keras

    layer = model.get_layer(first_unfrozen)
    cut = layer.input
    trunk = keras.Model(model.inputs, cut, name="frozen_trunk")
    why = ""
    try:
        top = keras.Model(cut, model.outputs[0], name="trainable_top")
        # Keras may accept the cut and trace a skip branch back past it: then the top holds trunk layers.
        below = {id(la) for la in trunk.layers if la.weights or type(la).__name__ != "InputLayer"}
        crossing = [la.name for la in top.layers if id(la) in below]
        if crossing:
            why = f"layer {crossing[0]!r} lies below the cut"
    except Exception as exc:  # Keras says the graph is disconnected from the given input
        why = str(exc).splitlines()[0][:160]
    if why:
        raise FeatureCacheError(f"cannot train on cached features from {first_unfrozen!r}: the layers above it "
                                f"also read tensors from below it ({why}); pass --no_feature_cache or another "
                                "--unfreeze_from")
    return trunk, top


def cache_features(trunk, dataset, *, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run `trunk` once over a tf.data dataset of (float images (B, H, W, 3), targets (B, C)) batches.

    Returns (features float32 (N, h, w, c), targets float32 (N, C)); with `flip`, each image's left-right mirror
    image follows as a second example with the same target (the cache of flip augmentation: both orientations,
    every epoch). The trunk runs in inference mode (BatchNorm uses its moving statistics, as it does frozen).
    """
    feats, ys = [], []
    for x, y in dataset:
        x = np.asarray(x)
        batch = np.concatenate([x, x[:, :, ::-1]]) if flip else x
        f = np.asarray(trunk(batch, training=False), np.float32)
        feats.append(f)
        ys.append(np.concatenate([y, y]) if flip else np.asarray(y))
    if not feats:
        raise FeatureCacheError("no image to cache features of")
    return np.concatenate(feats), np.concatenate(ys).astype(np.float32)


def feature_dataset(features: np.ndarray, targets: np.ndarray, *, batch_size: int, shuffle: bool, seed: int = 0):
    """tf.data batches of cached (features, targets), reshuffled every epoch when `shuffle`."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((features, targets))
    if shuffle:
        ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(2)
