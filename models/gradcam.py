"""Grad-CAM for classifiers whose head is not GlobalAveragePooling2D -> Dense (opt-in: `--method gradcam`).

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017:
with A the last 4-D feature map (h x w x K) and y_c the pre-softmax score (logit) of class c,

    alpha_kc = mean_ij  d y_c / d A_k(i, j)          GradCAM_c = ReLU( sum_k alpha_kc A_k )

For a GAP + linear Dense head, d y_c / d A_k(i, j) = W[k, c] / (h w), so Grad-CAM is ReLU(CAM_c) / (h w): the same
map up to a positive factor wherever CAM is positive. Slower than CAM: it needs a gradient tape and one backward
pass through the head per chosen class, while CAM reads the Dense kernel. One tape covers the whole batch.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from .cam import (
    CamOutputs,
    ModelStructureError,
    _activation_name,
    _input_of,
    _kind,
    _producer,
    _step_back,
    check_batch,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GradCamHead:
    """Where Grad-CAM's ingredients live in a Keras model.

    feature: the symbolic 4-D feature map (None, h, w, K), the last one before the head.
    logits: the symbolic pre-activation class scores (None, C), or None when `dense` must be re-applied.
    dense: the output Dense layer when its own activation (softmax/sigmoid) hides the logits, else None;
      then logits = dense_input @ kernel + bias.
    dense_input: the symbolic input of `dense` (set together with it).
    output_activation: "softmax", "sigmoid" or "linear" (the latter gets softmaxed into probabilities).
    num_classes: C. description: the path found, for logs.
    """

    feature: Any
    logits: Any
    dense: Any
    dense_input: Any
    output_activation: str
    num_classes: int
    description: str


def find_gradcam_head(model, *, feature_layer: str | None = None) -> GradCamHead:
    """Find the pre-activation class scores and the last 4-D feature map feeding them.

    The output may be a Dense layer (any activation in softmax/sigmoid/linear) or a Softmax/Activation layer
    after anything linear. The feature map is found by walking back from the output through single-input layers
    until the first 4-D tensor larger than 1x1 (Dense, Flatten, pooling, Dropout, 1x1 convolutions ... are all
    allowed on the way); name it with `feature_layer` (a top-level layer) to pick another.

    Raises:
      ModelStructureError: no 4-D tensor on the path, a layer with several inputs on it, or an unusable output.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelStructureError(
            f"expected one image input and one class output, found {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs"
        )
    out = model.outputs[0]
    if len(out.shape) != 2 or out.shape[-1] is None:
        raise ModelStructureError(f"expected class scores of shape (batch, classes), found {tuple(out.shape)}")
    num_classes = int(out.shape[-1])
    layer = _producer(out)
    cls = _kind(layer)
    logits, dense, dense_input, activation = out, None, None, "linear"
    steps = []
    if cls in ("Activation", "Softmax"):
        activation = "softmax" if cls == "Softmax" else _activation_name(layer)
        steps.append(f"{layer.name} ({cls})")
        logits, layer, cls = _step_back(out)
    elif cls == "Dense":
        activation = _activation_name(layer)
        if activation != "linear":
            dense, logits = layer, None
            dense_input = _input_of(out)
    if activation not in ("softmax", "sigmoid", "linear"):
        raise ModelStructureError(
            f"output activation {activation!r} is not softmax, sigmoid or linear; Grad-CAM needs the class logits"
        )
    if feature_layer:
        try:
            feature = model.get_layer(feature_layer).output
        except ValueError:
            raise ModelStructureError(
                f"--feature_layer {feature_layer!r} is not a layer of the model; top-level layers: "
                f"{[l.name for l in model.layers]}"
            ) from None
        if len(feature.shape) != 4:
            raise ModelStructureError(f"--feature_layer {feature_layer!r} gives shape {tuple(feature.shape)}, "
                                      "expected a 4-D feature map")
        steps.append(f"{feature_layer} (features, named)")
    else:
        tensor = logits if logits is not None else out
        # A 1x1 map (after GAP with keepdims, as in MobileNetV3's convolutional head) locates nothing: go on.
        while len(tensor.shape) != 4 or tuple(tensor.shape[1:3]) == (1, 1):
            if layer is None or cls == "InputLayer":
                raise ModelStructureError(
                    "no 4-D feature map between the input and the output; path from the output: " + " <- ".join(steps)
                )
            steps.append(f"{layer.name} ({cls})")
            tensor, layer, cls = _step_back(tensor)
        if layer is None or cls == "InputLayer":
            raise ModelStructureError(
                "no feature map: the first 4-D tensor walking back from the output is the input image; path from "
                "the output: " + " <- ".join(steps)
            )
        feature = tensor
        steps.append(f"{layer.name} ({cls}, features)")
    return GradCamHead(feature, logits, dense, dense_input, activation, num_classes, " <- ".join(steps))


class GradCamModel:
    """Grad-CAM with the same call and outputs as `cam.CamModel` (scores, top-k, maps of the chosen classes).

    Example:
      gm = GradCamModel(keras_model, input_size=(96, 96), scale=1/255, offset=0.0, top_k=1)
      out = gm(uint8_batch)                    # out.cams: float32 (B, 1, 96, 96), >= 0

    Maps are >= 0 (ReLU); a class with no positive evidence gets an all-zero map, hence no box. One compiled
    function per number of maps per image (top_k + requested labels); the batch dimension stays dynamic.
    """

    def __init__(
        self,
        model,
        *,
        input_size: tuple[int, int],
        scale: float,
        offset: float,
        top_k: int = 1,
        feature_layer: str | None = None,
    ):
        import keras
        import tensorflow as tf

        self.head = find_gradcam_head(model, feature_layer=feature_layer)
        self.num_classes = self.head.num_classes
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(int(top_k), self.num_classes)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature_size = tuple(int(v) if v is not None else None for v in self.head.feature.shape[1:3])
        head = self.head
        score_source = head.logits if head.logits is not None else head.dense_input
        self._model = keras.Model(model.inputs, [head.feature, score_source, model.outputs[0]])
        self._scale, self._offset = float(scale), float(offset)
        self._tf = tf
        self._functions: dict[int, Any] = {}

    def _function(self, m_extra: int):
        """The compiled forward + backward pass for `m_extra` requested classes per image (cached)."""
        if m_extra in self._functions:
            return self._functions[m_extra]
        tf = self._tf
        head, model = self.head, self._model
        h_in, w_in = self.input_size
        k, c_count, scale, offset = self.top_k, self.num_classes, self._scale, self._offset

        @tf.function(input_signature=[
            tf.TensorSpec([None, h_in, w_in, 3], tf.uint8),
            tf.TensorSpec([None, m_extra], tf.int32),
        ])
        def forward(images, extra):
            x = tf.cast(images, tf.float32) * scale + offset
            with tf.GradientTape(persistent=True) as tape:
                # Watching the input records every op even in a model whose weights are all frozen.
                tape.watch(x)
                fmap, source, probs = model(x, training=False)
                if head.dense is not None:
                    logits = tf.matmul(tf.cast(source, tf.float32), tf.cast(head.dense.kernel, tf.float32))
                    if head.dense.use_bias:
                        logits = logits + tf.cast(head.dense.bias, tf.float32)
                else:
                    logits = tf.cast(source, tf.float32)
            probs = tf.cast(probs, tf.float32)
            if head.output_activation == "linear":
                probs = tf.nn.softmax(probs, axis=-1)
            top_scores, top_classes = tf.math.top_k(probs, k=k)
            classes = tf.concat([top_classes, tf.maximum(extra, 0)], axis=1)  # (B, M)
            alphas = []
            for m in range(k + m_extra):
                # Images are independent in inference mode, so one backward pass per map index serves the batch.
                grads = tape.gradient(logits, fmap, output_gradients=tf.one_hot(classes[:, m], c_count))
                alphas.append(tf.reduce_mean(tf.cast(grads, tf.float32), axis=[1, 2]))  # (B, K)
            del tape
            fmap = tf.cast(fmap, tf.float32)
            alpha = tf.stack(alphas, axis=1)  # (B, M, K)
            low = tf.nn.relu(tf.einsum("bhwk,bmk->bmhw", fmap, alpha))
            return probs, top_classes, top_scores, classes, low

        self._functions[m_extra] = forward
        return forward

    @property
    def tracing_count(self) -> int:
        """Traces over all compiled functions (one per distinct number of requested classes)."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())

    def __call__(self, images: np.ndarray, extra: np.ndarray | None = None) -> CamOutputs:
        """Run one batch; same contract as `cam.CamModel.__call__` (uint8 (B, H_in, W_in, 3), extra -1 padded)."""
        images, extra = check_batch(images, extra, self.input_size, self.num_classes)
        return CamOutputs.from_tensors(self._function(extra.shape[1])(images, extra), self.input_size)
