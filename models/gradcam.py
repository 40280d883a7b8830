"""Grad-CAM for classifiers whose head is not GlobalAveragePooling2D -> Dense (opt-in: `--method gradcam`).

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017:
with A the last 4-D feature map (h x w x K) and y_c the pre-softmax score (logit) of class c,

    alpha_kc = mean_ij  d y_c / d A_k(i, j)          GradCAM_c = ReLU( sum_k alpha_kc A_k )

For a GAP + linear Dense head, d y_c / d A_k(i, j) = W[k, c] / (h w), so Grad-CAM is ReLU(CAM_c) / (h w): the same
map up to a positive factor wherever CAM is positive. Slower than CAM: it needs a gradient tape and one backward
pass through the head per chosen class, while CAM reads the Dense kernel. One tape covers the whole batch.
"""
from __future__ import annotations

from .cam import CamMethod
from .graph import GradCamHead, find_gradcam_head  # noqa: F401  (public API)


class GradCamModel(CamMethod):
    """Grad-CAM with the same call and outputs as `cam.CamModel` (scores, top-k, maps of the chosen classes).

    Example:
      gm = GradCamModel(keras_model, input_size=(96, 96), scale=1/255, offset=0.0, top_k=1)
      out = gm(uint8_batch)                    # out.cams: float32 (B, 1, 96, 96), >= 0

    Maps are >= 0 (ReLU); a class with no positive evidence gets an all-zero map, hence no box. One compiled
    function per number of maps per image (top_k + requested labels): the backward passes are unrolled.
    """

    name = "gradcam"
    dynamic_extra = False

    def __init__(self, model, *, input_size: tuple[int, int], scale: float, offset: float, top_k: int = 1,
                 feature_layer: str | None = None):
        super().__init__(model, input_size=input_size, scale=scale, offset=offset, top_k=top_k,
                         feature_layer=feature_layer)

    @staticmethod
    def find_head(model, *, feature_layer: str | None = None) -> GradCamHead:
        return find_gradcam_head(model, feature_layer=feature_layer)

    def _setup(self, model) -> None:
        import keras

        head = self.head
        score_source = head.logits if head.logits is not None else head.dense_input
        self._model = keras.Model(model.inputs, [head.feature, score_source, model.outputs[0]])

    def _scores(self, x):
        import tensorflow as tf

        head = self.head
        tape = tf.GradientTape(persistent=True)
        with tape:
            # Watching the input records every op even in a model whose weights are all frozen.
            tape.watch(x)
            fmap, source, probs = self._model(x, training=False)
            if head.dense is not None:
                logits = tf.matmul(tf.cast(source, tf.float32), tf.cast(head.dense.kernel, tf.float32))
                if head.dense.use_bias:
                    logits = logits + tf.cast(head.dense.bias, tf.float32)
            else:
                logits = tf.cast(source, tf.float32)
        return self._probabilities(probs), {"tape": tape, "fmap": fmap, "logits": logits}

    def _maps(self, state, classes):
        import tensorflow as tf

        tape, fmap, logits = state["tape"], state["fmap"], state["logits"]
        alphas = []
        for m in range(classes.shape[1]):
            # Images are independent in inference mode, so one backward pass per map index serves the batch.
            grads = tape.gradient(logits, fmap, output_gradients=tf.one_hot(classes[:, m], self.num_classes))
            alphas.append(tf.reduce_mean(tf.cast(grads, tf.float32), axis=[1, 2]))  # (B, K)
        del tape
        alpha = tf.stack(alphas, axis=1)  # (B, M, K)
        return tf.nn.relu(tf.einsum("bhwk,bmk->bmhw", tf.cast(fmap, tf.float32), alpha))
