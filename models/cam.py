"""Class Activation Maps in one compiled forward pass: a base class for CAM methods, and CAM itself.

Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016: for a network whose head is
feature map f (h x w x K) -> GlobalAveragePooling2D -> Dense(W: K x C), the map of class c is

    CAM_c(i, j) = sum_k W[k, c] * f_k(i, j)

(the Dense bias is a constant shift and vanishes under the min-max normalisation applied later).

`CamMethod` is the shared part of every method (as torchcam's `_CAM`): the constructor, the preprocessing
`x = pixels * scale + offset`, the graph tail (probabilities, softmax when the head is linear, the top-k classes,
the requested extra classes) and `__call__`. A method adds a class with two hooks: `_scores(x)` runs the network
and returns the probabilities with whatever the maps need, and `_maps(state, classes)` gives the low-resolution maps
of the chosen classes. Everything runs as one `tf.function`; `CamOutputs` upsamples the maps that are used (OpenCV,
outside the graph). The Keras graph walk that finds the feature map and the head is `graph.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import cv2
import numpy as np

from .graph import GapHead, ModelStructureError, find_gap_head, layer_features, model_input_size  # noqa: F401


@dataclasses.dataclass(frozen=True)
class CamOutputs:
    """One batch of results, all numpy.

    scores: float32 (B, C) class probabilities (softmax applied to a linear head).
    top_classes: int32 (B, k) class ids by decreasing score; top_scores: float32 (B, k).
    cam_classes: int32 (B, M) the classes whose maps follow: the k top classes, then the requested ones.
    low_res: float32 (B, M, h, w) raw CAMs at the feature-map resolution.
    size: (H_in, W_in), the model input size the maps are upsampled to (`cams`, `maps`).

    The upsampling runs outside the graph, on the maps that are used: OpenCV resizes one 24x24 map to 96x96 in
    about 10 us, where TensorFlow's resize of the whole batch cost 30 us an image on the benchmark's small CNN.
    """

    scores: np.ndarray
    top_classes: np.ndarray
    top_scores: np.ndarray
    cam_classes: np.ndarray
    low_res: np.ndarray
    size: tuple[int, int]
    features: np.ndarray | None = None  # float32 (B, h, w, K) the feature map, from a method asked for it

    @classmethod
    def from_tensors(cls, outs, size) -> "CamOutputs":
        """From a compiled forward's (scores, top classes, top scores, classes, low-res maps[, features])."""
        scores, top_c, top_s, classes, low, *feats = (o.numpy() for o in outs)
        return cls(scores, top_c.astype(np.int32), top_s, classes.astype(np.int32), low,
                   (int(size[0]), int(size[1])), feats[0] if feats else None)

    @functools.cached_property
    def cams(self) -> np.ndarray:
        """float32 (B, M, H_in, W_in): every raw CAM upsampled bilinearly to the model input size."""
        b, m, h, w = self.low_res.shape
        return upsample(self.low_res.reshape(b * m, h, w), self.size).reshape(b, m, *self.size)

    def maps(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """float32 (n, H_in, W_in): the maps cams[images[i], indices[i]], upsampling only those."""
        return upsample(self.low_res[images, indices], self.size)

    def column(self, index: int) -> np.ndarray:
        """float32 (B, H_in, W_in): cams[:, index], upsampling only that map of each image."""
        b = self.low_res.shape[0]
        return self.maps(np.arange(b), np.full(b, int(index)))


def upsample(low: np.ndarray, size) -> np.ndarray:
    """(N, h, w) maps -> float32 (N, H, W), bilinear with half-pixel centres (as `tf.image.resize` and cv2.resize
    in clovaai/wsolevaluation; the two agree within 1e-6)."""
    low = np.asarray(low, np.float32)
    h_out, w_out = int(size[0]), int(size[1])
    out = np.empty((low.shape[0], h_out, w_out), np.float32)
    if low.shape[1:] == (h_out, w_out):
        out[...] = low
        return out
    for i in range(low.shape[0]):
        cv2.resize(low[i], (w_out, h_out), dst=out[i], interpolation=cv2.INTER_LINEAR)
    return out


def check_batch(images, extra, input_size, num_classes) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch for a compiled CAM function: uint8 (B, H_in, W_in, 3) images, int32 (B, M) extra ids."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*input_size, 3):
        raise ValueError(
            f"expected uint8 images of shape (B, {input_size[0]}, {input_size[1]}, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if extra is None:
        extra = np.zeros((images.shape[0], 0), np.int32)
    extra = np.asarray(extra, dtype=np.int32).reshape(images.shape[0], -1)
    if extra.size and extra.max() >= num_classes:
        raise ValueError(f"class id {int(extra.max())} out of range for {num_classes} classes")
    return images, extra


class CamMethod:
    """A loaded classifier with one compiled function giving class scores, the top-k classes and the maps of the
    chosen classes, in one call.

    Example (any subclass):
      m = CamModel(keras_model, input_size=(96, 96), scale=1/255, offset=0.0, top_k=1)
      out = m(uint8_batch)                    # uint8 (B, 96, 96, 3) -> CamOutputs
      out = m(uint8_batch, extra=[[3], [1]])  # also the maps of classes 3 and 1

    Subclasses implement `find_head` (where the method's ingredients are in the Keras graph; the head has
    `feature`, `num_classes`, `output_activation` and `description`), `_setup`, `_scores` and `_maps`. A method
    whose graph depends on the number of requested classes per image sets `dynamic_extra = False` and gets one
    compiled function per count; the batch dimension is always dynamic, so a short last batch does not retrace.

    Raises:
      ModelStructureError: the model lacks what the method needs.
      ValueError: top_k outside 1..number of classes.
    """

    name = "cam"
    dynamic_extra = True

    def __init__(self, model, *, input_size: tuple[int, int], scale: float, offset: float, top_k: int = 1,
                 **head_options):
        self.head = self.find_head(model, **head_options)
        self.num_classes = int(self.head.num_classes)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if top_k > self.num_classes:
            raise ValueError(f"top_k {top_k} is larger than the model's {self.num_classes} classes")
        self.top_k = int(top_k)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature_size = tuple(int(v) if v is not None else None for v in self.head.feature.shape[1:3])
        self.scale, self.offset = float(scale), float(offset)
        self._functions: dict[Any, Any] = {}
        self._setup(model)

    # -- hooks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def find_head(model, **head_options):
        raise NotImplementedError

    def _setup(self, model) -> None:
        """Build, once, what the graph needs (a Keras model with extra outputs, constant weights)."""
        raise NotImplementedError

    def _scores(self, x):
        """float32 model input (B, H, W, 3) -> (probabilities (B, C), state for `_maps`)."""
        raise NotImplementedError

    def _maps(self, state, classes):
        """int32 classes (B, M) -> float32 maps (B, M, h, w) at the feature-map resolution."""
        raise NotImplementedError

    def _extras(self, state) -> tuple:
        """Further outputs after the maps (`CamOutputs.features`): none by default; a method that keeps its
        feature map (co-localization, models/coloc.py) returns it here."""
        return ()

    # -- shared --------------------------------------------------------------------------------------------------
    def _probabilities(self, raw):
        """The model output as float32 probabilities: a linear head is softmaxed, others are taken as they are."""
        import tensorflow as tf

        raw = tf.cast(raw, tf.float32)
        return tf.nn.softmax(raw, axis=-1) if self.head.output_activation == "linear" else raw

    def _graph(self, images, extra):
        import tensorflow as tf

        x = tf.cast(images, tf.float32) * self.scale + self.offset
        scores, state = self._scores(x)
        top_scores, top_classes = tf.math.top_k(scores, k=self.top_k)
        classes = tf.concat([top_classes, tf.maximum(extra, 0)], axis=1)  # (B, M)
        return (scores, top_classes, top_scores, classes, self._maps(state, classes), *self._extras(state))

    def function(self, m_extra: int | None = None):
        """The compiled forward pass: (uint8 (B, H_in, W_in, 3), int32 (B, M)) -> (scores, top classes,
        top scores, classes, low-res maps). One function for every M where `dynamic_extra`, else one per M."""
        import tensorflow as tf

        key = None if self.dynamic_extra else int(m_extra or 0)
        if key not in self._functions:
            h_in, w_in = self.input_size
            self._functions[key] = tf.function(
                self._graph,
                input_signature=[tf.TensorSpec([None, h_in, w_in, 3], tf.uint8), tf.TensorSpec([None, key], tf.int32)],
                reduce_retracing=True,
            )
        return self._functions[key]

    @property
    def forward(self):
        """The compiled function of a method with a dynamic number of requested classes (see `function`)."""
        if not self.dynamic_extra:
            raise AttributeError(f"{type(self).__name__} compiles one function per number of requested classes: "
                                 "use function(m_extra)")
        return self.function()

    @property
    def tracing_count(self) -> int:
        """How many times the graph was traced, over all compiled functions (1 after any number of batches of any
        size, for a method with a dynamic number of requested classes)."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())

    def __call__(self, images: np.ndarray, extra: np.ndarray | None = None) -> CamOutputs:
        """Run one batch.

        Args:
          images: uint8 (B, H_in, W_in, 3) RGB at the model input size.
          extra: int (B, M) further class ids whose maps are wanted, -1 for padding (its map is of class 0 and
            must be ignored by the caller), or None.
        """
        images, extra = check_batch(images, extra, self.input_size, self.num_classes)
        return CamOutputs.from_tensors(self.function(extra.shape[1])(images, extra), self.input_size)


class CamModel(CamMethod):
    """CAM (Zhou et al. 2016) of a GAP classifier: maps from the Dense kernel, in the forward pass, no gradients.

    With `flip_tta`, each batch also runs mirrored; scores and CAMs are the means of both passes (the mirrored
    CAM flipped back), which evens out the left/right bias of a single map.

    With `contrast`, the map of class c weighs the features by w_c minus the mean of all classes' weights: the
    CAM of c's logit margin over the average class. Evidence every class shares (strokes of any digit, clutter)
    cancels; the scores are unchanged. Needs at least two classes.

    With `scales` other than (1,), each batch also runs resized by each factor (multi-scale test-time averaging,
    on a copy of the model whose input takes any size, sharing its weights): the feature maps are resized
    bilinearly to the grid of the largest scale and averaged, and the scores too. With `features`, the (averaged)
    feature map is returned as well (`CamOutputs.features`): the GAP head's, or with `features_layer` that of
    another top-level layer (`graph.layer_features`; co-localization on a finer map), averaged alike.
    """

    name = "cam"

    def __init__(self, model, *, input_size: tuple[int, int], scale: float, offset: float, top_k: int = 1,
                 feature_layer: str | None = None, dense_layer: str | None = None, flip_tta: bool = False,
                 contrast: bool = False, scales: tuple[float, ...] = (1.0,), features: bool = False,
                 features_layer: str | None = None):
        self.flip_tta = bool(flip_tta)
        self.contrast = bool(contrast)
        self.scales = tuple(float(f) for f in scales)
        if not self.scales or any(not 0.25 <= f <= 4.0 for f in self.scales):
            raise ValueError(f"test-time scales must be within [0.25, 4], got {self.scales}")
        self.features = bool(features)
        if features_layer and not self.features:
            raise ValueError("features_layer names the feature map returned with features=True")
        self.features_layer = features_layer or None
        self._head_options = {"feature_layer": feature_layer, "dense_layer": dense_layer}
        super().__init__(model, input_size=input_size, scale=scale, offset=offset, top_k=top_k,
                         feature_layer=feature_layer, dense_layer=dense_layer)

    @staticmethod
    def find_head(model, *, feature_layer: str | None = None, dense_layer: str | None = None) -> GapHead:
        return find_gap_head(model, feature_layer=feature_layer, dense_layer=dense_layer)

    def _setup(self, model) -> None:
        import keras
        import tensorflow as tf

        if self.contrast and self.num_classes < 2:
            raise ValueError("contrast CAMs need a model with at least two classes")
        extra = [layer_features(model, self.features_layer)] if self.features_layer else []
        self._cam_model = keras.Model(model.inputs, [self.head.feature, model.outputs[0], *extra])
        if self.scales != (1.0,):
            self._cam_model = _any_size(model, self._head_options, self.features_layer)
        kernel_t = tf.transpose(tf.convert_to_tensor(self.head.dense.kernel))  # (C, K)
        if self.contrast:
            kernel_t = kernel_t - tf.reduce_mean(kernel_t, axis=0, keepdims=True)
        self._kernel_t = kernel_t

    def _averaged(self, x):
        """Feature map, probabilities and the `features_layer` map (None without one), averaged over the
        scales, each map on its largest scale's grid."""
        import tensorflow as tf

        def mean_map(maps):
            grid = max((tuple(m.shape[1:3]) for m in maps), key=lambda g: g[0] * g[1])
            return tf.add_n([m if tuple(m.shape[1:3]) == grid else tf.image.resize(m, grid) for m in maps]) / len(maps)

        h_in, w_in = self.input_size
        runs = []
        for f in self.scales:
            xs = x if f == 1.0 else tf.image.resize(x, (max(1, round(h_in * f)), max(1, round(w_in * f))))
            fmap, scores, *extra = self._cam_model(xs, training=False)
            runs.append((tf.cast(fmap, tf.float32), self._probabilities(scores),
                         tf.cast(extra[0], tf.float32) if extra else None))
        if len(runs) == 1:
            return runs[0]
        return (mean_map([r[0] for r in runs]), tf.add_n([r[1] for r in runs]) / len(runs),
                mean_map([r[2] for r in runs]) if self.features_layer else None)

    def _scores(self, x):
        import tensorflow as tf

        fmap, scores, layer_map = self._averaged(x)
        if self.flip_tta:
            # CAMs are linear in the feature map, so averaging the maps (the mirrored one flipped back) averages
            # the CAMs of the picture and of its mirror image.
            fmap_f, scores_f, layer_f = self._averaged(tf.reverse(x, axis=[2]))
            fmap = (fmap + tf.reverse(fmap_f, axis=[2])) / 2.0
            scores = (scores + scores_f) / 2.0
            if layer_map is not None:
                layer_map = (layer_map + tf.reverse(layer_f, axis=[2])) / 2.0
        return scores, {"fmap": fmap, "layer": layer_map}

    def _extras(self, state) -> tuple:
        if not self.features:
            return ()
        return (state["layer"] if self.features_layer else state["fmap"],)

    def _maps(self, state, classes):
        import tensorflow as tf

        weights = tf.gather(self._kernel_t, classes)  # (B, M, K)
        return tf.einsum("bhwk,bmk->bmhw", state["fmap"], weights)


def _any_size(model, head_options, features_layer=None):
    """The (features, scores[, `features_layer` map]) model of `model` on an input of any size, sharing its
    layers and weights (for multi-scale averaging: a saved model's input is usually fixed at its training size)."""
    import keras

    try:
        free = keras.models.clone_model(model, input_tensors=keras.Input((None, None, 3)),
                                        clone_function=lambda layer: layer, recursive=True)
    except Exception as exc:  # Keras raises many kinds; the message says which
        raise ModelStructureError(f"test-time scales need the model on other input sizes, which failed: {exc}") from exc
    head = find_gap_head(free, **head_options)
    extra = [layer_features(free, features_layer)] if features_layer else []
    return keras.Model(free.inputs, [head.feature, free.outputs[0], *extra])
