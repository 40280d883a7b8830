"""Class Activation Maps from a GAP classifier, in one forward pass.

Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016: for a network whose head is
feature map f (h x w x K) -> GlobalAveragePooling2D -> Dense(W: K x C), the map of class c is

    CAM_c(i, j) = sum_k W[k, c] * f_k(i, j)

(the Dense bias is a constant shift and vanishes under the min-max normalisation applied later). We find f and W
in the Keras graph, build once a model with the feature map as an extra output (the tf-keras-vis way, no hooks,
no gradients) and compile one `tf.function` that returns scores, the top-k classes and the CAMs of the chosen
classes together, at the feature-map resolution; `CamOutputs` upsamples them to the model input size (OpenCV,
outside the graph) for the maps that are used.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# Layers that may sit between GlobalAveragePooling2D and the Dense head without changing the maths at inference.
_PASS_THROUGH = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity")
_OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "linear")


class ModelStructureError(ValueError):
    """The model is not (or cannot be read as) conv features -> GlobalAveragePooling2D -> Dense."""


@dataclasses.dataclass
class GapHead:
    """Where the CAM ingredients live in a Keras model.

    feature: the symbolic 4-D feature map tensor (None, h, w, K) in the model's graph.
    dense: the Dense layer whose kernel (K, C) weighs the pooled features.
    output_activation: "softmax", "sigmoid" or "linear": what turns the Dense output into the model output.
    description: the path found, for logs and errors.
    """

    feature: Any
    dense: Any
    output_activation: str
    description: str


def file_fingerprint(data: bytes) -> str:
    """Content hash used to name a model in outputs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


class ModelFileError(ValueError):
    """A --model file that is not a readable Keras model (truncated, another format, a sidecar JSON)."""


def check_model_file(local_path: str) -> None:
    """Refuse, with what was found, a file Keras would misreport ("File not found" for a file that exists).

    Raises:
      ModelFileError: empty, JSON (a sidecar or thresholds file), or neither a zip (.keras) nor HDF5 (.h5) file.
    """
    with open(local_path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ModelFileError(f"{local_path} is empty: expected a .keras (zip) or .h5 (HDF5) model file")
    if head.lstrip()[:1] in (b"{", b"["):
        raise ModelFileError(f"{local_path} is a JSON file (a sidecar or thresholds file?), not a model: pass the "
                             ".keras file as --model")
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        if not zipfile.is_zipfile(local_path):
            raise ModelFileError(f"{local_path} is a damaged or truncated .keras archive (its zip directory is "
                                 "missing): copy the model file again")
    elif not head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise ModelFileError(f"{local_path} is not a Keras model file: expected a .keras (zip) or .h5 (HDF5) file, "
                             f"found bytes {head[:4]!r}")


def load_keras_model(local_path: str, *, safe_mode: bool = True):
    """Load a `.keras` or `.h5` model for inference. `safe_mode` refuses arbitrary code (Lambda layers).

    Raises:
      ModelFileError: the file is not a readable model (see check_model_file; truncated or damaged archives).
      ModelStructureError: the model needs safe_mode off.
    """
    import keras

    check_model_file(local_path)
    if not safe_mode:
        logger.warning("loading %s with safe_mode OFF: the file may run arbitrary Python code", local_path)
    try:
        return keras.models.load_model(local_path, compile=False, safe_mode=safe_mode)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelStructureError(
                f"{local_path}: the model needs unsafe deserialization (e.g. a Lambda layer) and safe_mode is on; "
                "pass --unsafe_load only if you trust the file"
            ) from exc
        raise ModelFileError(f"{local_path} cannot be loaded as a Keras model (truncated or damaged?): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError from h5py, KeyError in a damaged config ...
        raise ModelFileError(f"{local_path} cannot be loaded as a Keras model (truncated or damaged?): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


def _producer(tensor):
    """The layer that produced a symbolic Keras tensor, or None for a model input."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    return history.operation


def _input_of(tensor):
    """The single symbolic input of the layer call that produced `tensor`.

    Follows the call's own node (not the layer's first), since a layer may be called more than once, as in a
    Sequential model that was built and then reloaded.
    """
    history = tensor._keras_history
    layer = history.operation
    inputs = layer._inbound_nodes[history.node_index].input_tensors
    if len(inputs) != 1:
        raise ModelStructureError(f"layer {layer.name!r} has {len(inputs)} inputs, expected 1")
    return inputs[0]


def _kind(layer) -> str:
    return type(layer).__name__ if layer is not None else "the model input"


def _step_back(tensor):
    """One layer towards the input: (its input tensor, the layer producing that, that layer's class name)."""
    tensor = _input_of(tensor)
    layer = _producer(tensor)
    return tensor, layer, _kind(layer)


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else "linear"


def find_gap_head(model, *, feature_layer: str | None = None, dense_layer: str | None = None) -> GapHead:
    """Locate the feature map and the Dense kernel of a GAP classifier.

    Walks back from the model output: optional output activation (Activation/Softmax), the Dense layer,
    optional pass-through layers (Dropout), GlobalAveragePooling2D, and the 4-D tensor feeding it, which may be
    the output of a nested model such as a `keras.applications` backbone. `feature_layer`/`dense_layer`
    name the layers instead (top-level layers of `model`).

    Raises:
      ModelStructureError: with what was found where the expected layer was not.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelStructureError(
            f"expected one image input and one class output, found {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs"
        )
    if feature_layer or dense_layer:
        return _named_head(model, feature_layer, dense_layer)

    tensor = model.outputs[0]
    layer = _producer(tensor)
    steps = []
    output_activation = None
    cls = _kind(layer)
    if cls in ("Activation", "Softmax"):
        output_activation = "softmax" if cls == "Softmax" else _activation_name(layer)
        steps.append(f"{layer.name} ({cls})")
        tensor, layer, cls = _step_back(tensor)
    if cls != "Dense":
        raise ModelStructureError(
            f"no GAP classifier head: expected the output to come from a Dense layer, found {cls}"
            + (f" ({layer.name})" if layer is not None else "")
            + "; for other heads name the layers with --feature_layer/--dense_layer"
        )
    dense = layer
    dense_act = _activation_name(dense)
    if output_activation is None:
        output_activation = dense_act
    elif dense_act != "linear":
        raise ModelStructureError(f"Dense {dense.name!r} has activation {dense_act} followed by another activation")
    if output_activation not in _OUTPUT_ACTIVATIONS:
        raise ModelStructureError(
            f"output activation {output_activation!r} is not one of {_OUTPUT_ACTIVATIONS}; CAM needs a linear map "
            "from pooled features to class scores"
        )
    steps.append(f"{dense.name} (Dense)")
    tensor, layer, cls = _step_back(tensor)
    while cls in _PASS_THROUGH:
        steps.append(f"{layer.name} ({cls})")
        tensor, layer, cls = _step_back(tensor)
    if cls != "GlobalAveragePooling2D":
        raise ModelStructureError(
            f"no GAP classifier head: Dense {dense.name!r} is fed by {cls}"
            + (f" ({layer.name})" if layer is not None else "")
            + ", expected GlobalAveragePooling2D; path from the output: " + " <- ".join(steps)
        )
    gap = layer
    if getattr(gap, "data_format", "channels_last") != "channels_last" or getattr(gap, "keepdims", False):
        raise ModelStructureError(f"{gap.name!r}: only channels_last GlobalAveragePooling2D without keepdims is supported")
    steps.append(f"{gap.name} (GlobalAveragePooling2D)")
    feature = _input_of(tensor)
    producer = _producer(feature)
    steps.append(f"{producer.name if producer is not None else 'input'} ({type(producer).__name__})")
    _check_shapes(feature, dense)
    return GapHead(feature, dense, output_activation, " <- ".join(steps))


def _named_head(model, feature_layer, dense_layer) -> GapHead:
    names = [l.name for l in model.layers]

    def get(name, role):
        try:
            return model.get_layer(name)
        except ValueError:
            raise ModelStructureError(f"--{role} {name!r} is not a layer of the model; top-level layers: {names}")

    if not (feature_layer and dense_layer):
        raise ModelStructureError("--feature_layer and --dense_layer go together: name both or neither")
    feat = get(feature_layer, "feature_layer")
    dense = get(dense_layer, "dense_layer")
    if type(dense).__name__ != "Dense":
        raise ModelStructureError(f"--dense_layer {dense_layer!r} is a {type(dense).__name__}, expected Dense")
    feature = feat.output
    _check_shapes(feature, dense)
    out_act = _activation_name(dense)
    out_layer = _producer(model.outputs[0])
    if out_layer is not dense and type(out_layer).__name__ == "Softmax":
        out_act = "softmax"
    elif out_layer is not dense and type(out_layer).__name__ == "Activation":
        out_act = _activation_name(out_layer)
    return GapHead(feature, dense, out_act, f"{dense.name} (Dense, named) / {feat.name} (features, named)")


def _check_shapes(feature, dense):
    shape = tuple(feature.shape)
    if len(shape) != 4:
        raise ModelStructureError(f"feature map must be 4-D (batch, h, w, channels), found shape {shape}")
    k = int(dense.kernel.shape[0])
    if shape[-1] != k:
        raise ModelStructureError(f"feature map has {shape[-1]} channels but Dense {dense.name!r} expects {k} inputs")


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

    @classmethod
    def from_tensors(cls, outs, size) -> "CamOutputs":
        """From a compiled forward's (scores, top classes, top scores, classes, low-res maps) tensors."""
        scores, top_c, top_s, classes, low = (o.numpy() for o in outs)
        return cls(scores, top_c.astype(np.int32), top_s, classes.astype(np.int32), low,
                   (int(size[0]), int(size[1])))

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


class CamModel:
    """A loaded GAP classifier with a compiled function giving scores and CAMs in one pass.

    Example:
      cm = CamModel(keras_model, input_size=(96, 96), scale=1/255, offset=0.0, top_k=1)
      out = cm(uint8_batch)                  # uint8 (B, 96, 96, 3)
      out = cm(uint8_batch, extra=[[3], [1]])  # also the CAMs of classes 3 and 1

    With `flip_tta`, each batch also runs mirrored; scores and CAMs are the means of both passes (the mirrored
    CAM flipped back), which evens out the left/right bias of a single map.

    With `contrast`, the map of class c weighs the features by w_c minus the mean of all classes' weights: the
    CAM of c's logit margin over the average class. Evidence every class shares (strokes of any digit, clutter)
    cancels; the scores are unchanged. Needs at least two classes.

    The function has a fixed signature (batch dimension None), so a short last batch does not retrace.
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
        dense_layer: str | None = None,
        flip_tta: bool = False,
        contrast: bool = False,
    ):
        import keras
        import tensorflow as tf

        self.head = find_gap_head(model, feature_layer=feature_layer, dense_layer=dense_layer)
        self.num_classes = int(self.head.dense.kernel.shape[1])
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(int(top_k), self.num_classes)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature_size = tuple(int(v) if v is not None else None for v in self.head.feature.shape[1:3])
        cam_model = keras.Model(model.inputs, [self.head.feature, model.outputs[0]])
        kernel_t = tf.transpose(tf.convert_to_tensor(self.head.dense.kernel))  # (C, K)
        if contrast:
            if self.num_classes < 2:
                raise ValueError("contrast CAMs need at least two classes")
            kernel_t = kernel_t - tf.reduce_mean(kernel_t, axis=0, keepdims=True)
        apply_softmax = self.head.output_activation == "linear"
        h_in, w_in = self.input_size
        k = self.top_k
        scale = float(scale)
        offset = float(offset)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, h_in, w_in, 3], tf.uint8),
                tf.TensorSpec([None, None], tf.int32),
            ],
            reduce_retracing=True,
        )
        def forward(images, extra):
            x = tf.cast(images, tf.float32) * scale + offset
            fmap, scores = cam_model(x, training=False)
            fmap = tf.cast(fmap, tf.float32)
            scores = tf.cast(scores, tf.float32)
            if apply_softmax:
                scores = tf.nn.softmax(scores, axis=-1)
            if flip_tta:
                # CAMs are linear in the feature map, so averaging the maps (the mirrored one flipped back)
                # averages the CAMs of the picture and of its mirror image.
                fmap_f, scores_f = cam_model(tf.reverse(x, axis=[2]), training=False)
                scores_f = tf.cast(scores_f, tf.float32)
                if apply_softmax:
                    scores_f = tf.nn.softmax(scores_f, axis=-1)
                fmap = (fmap + tf.reverse(tf.cast(fmap_f, tf.float32), axis=[2])) / 2.0
                scores = (scores + scores_f) / 2.0
            top_scores, top_classes = tf.math.top_k(scores, k=k)
            classes = tf.concat([top_classes, tf.maximum(extra, 0)], axis=1)  # (B, M)
            weights = tf.gather(kernel_t, classes)  # (B, M, K)
            low = tf.einsum("bhwk,bmk->bmhw", fmap, weights)
            return scores, top_classes, top_scores, classes, low

        self._forward = forward
        self.flip_tta = bool(flip_tta)
        self.contrast = bool(contrast)

    @property
    def tracing_count(self) -> int:
        """How many times the forward graph was traced (1 after any number of batches of any size)."""
        return self._forward.experimental_get_tracing_count()

    def __call__(self, images: np.ndarray, extra: np.ndarray | None = None) -> CamOutputs:
        """Run one batch.

        Args:
          images: uint8 (B, H_in, W_in, 3) RGB at the model input size.
          extra: int (B, M) further class ids whose CAMs are wanted, -1 for padding (its CAM is of class 0 and
            must be ignored by the caller), or None.
        """
        images, extra = check_batch(images, extra, self.input_size, self.num_classes)
        return CamOutputs.from_tensors(self._forward(images, extra), self.input_size)


def model_input_size(model) -> tuple[int | None, int | None]:
    """(H, W) of the model's image input, None where the model accepts any size."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ModelStructureError(f"expected an image input (batch, H, W, 3), found shape {shape}")
    if shape[-1] not in (3, None):
        raise ModelStructureError(f"expected 3 RGB channels in the model input, found {shape[-1]}")
    return shape[1], shape[2]
