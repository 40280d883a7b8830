"""Reading a Keras classifier's graph: where the feature map and the class scores are.

CAM needs conv features -> GlobalAveragePooling2D -> Dense (`find_gap_head`); Grad-CAM needs only the class logits
and the last 4-D feature map before them (`find_gradcam_head`). Both walk back from the model output through the
layers' own call nodes, so nested backbones (keras.applications) and reloaded Sequential models work alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any

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

    @property
    def num_classes(self) -> int:
        return int(self.dense.kernel.shape[1])


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
            raise ModelStructureError(
                f"--{role} {name!r} is not a layer of the model; top-level layers: {names}") from None

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


def model_input_size(model) -> tuple[int | None, int | None]:
    """(H, W) of the model's image input, None where the model accepts any size."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ModelStructureError(f"expected an image input (batch, H, W, 3), found shape {shape}")
    if shape[-1] not in (3, None):
        raise ModelStructureError(f"expected 3 RGB channels in the model input, found {shape[-1]}")
    return shape[1], shape[2]


def layer_features(model, name: str):
    """The symbolic 4-D output of the top-level layer `name`: a feature map for co-localization on another layer
    than the GAP head's (`--coloc_layer`).

    Raises:
      ModelStructureError: no such top-level layer, or its output is not a 4-D map larger than 1 x 1.
    """
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise ModelStructureError(f"--coloc_layer {name!r} is not a top-level layer of the model (a layer inside "
                                  f"a nested backbone cannot be read); top-level layers: "
                                  f"{[l.name for l in model.layers]}") from None
    out = _output_in_graph(model, layer)
    shape = tuple(out.shape) if out is not None else ()
    if len(shape) != 4 or shape[1:3] == (1, 1):
        raise ModelStructureError(f"--coloc_layer {name!r} gives shape {shape}, expected a 4-D feature map "
                                  "(batch, h, w, channels) larger than 1 x 1")
    return out


def _output_in_graph(model, layer):
    """The tensor `layer` produces on the path to `model`'s output (walking the call nodes back, so a model
    cloned on another input with shared layers gives its own tensor, not the original's `layer.output`), or None
    when it produces none there."""
    seen, todo = set(), list(model.outputs)
    while todo:
        t = todo.pop()
        history = getattr(t, "_keras_history", None)
        if history is None or id(t) in seen:
            continue
        seen.add(id(t))
        if history.operation is layer:
            return t
        todo.extend(history.operation._inbound_nodes[history.node_index].input_tensors)
    return None


def finer_layer(model, head: GapHead, factor: int = 2) -> str:
    """`--coloc_layer auto`: the layer of the residual stream `factor` times finer than the GAP head's map in
    both directions (stride 16 for a stride-32 head), i.e. the last top-level Add layer with that grid, else the
    last layer of any kind with it. MobileNetV2: block_12_add (14 x 14 x 96 at 224); ResNet50: conv4_block6_add;
    EfficientNetB0: block5c_add. The residual stream, not the wider expansion after it (MobileNetV2's
    block_13_expand_relu): on the shared photos DDT on block_12_add boxed 59% of test objects at IoU 0.5 against
    42% on block_13_expand_relu and 30% on the head's own map (BENCHMARKS.md).

    Raises:
      ModelStructureError: the head's grid is not fixed, or no layer has that grid (e.g. a nested backbone).
    """
    h, w = tuple(head.feature.shape)[1:3]
    if h is None or w is None:
        raise ModelStructureError("--coloc_layer auto needs a model with a fixed input size; name the layer")
    want = (factor * h, factor * w)
    last, last_add = None, None
    for layer in model.layers:
        out = layer.output
        if not isinstance(out, (list, tuple)) and len(out.shape) == 4 and tuple(out.shape[1:3]) == want:
            last = layer.name
            if _kind(layer) == "Add":
                last_add = layer.name
    if last is None:
        raise ModelStructureError(f"--coloc_layer auto: no top-level layer has a {want[0]} x {want[1]} map (the "
                                  f"head's is {h} x {w}); name one with --coloc_layer")
    return last_add or last
