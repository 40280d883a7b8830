"""Pretrained backbones from a user's own file, cut at a feature map and topped with a new GAP + Dense head.

A file is a whole classifier (`.keras`/`.h5`; the backbone is taken up to its GlobalAveragePooling2D input), a
bare backbone (a model whose output is a 4-D feature map), or weights only (`.weights.h5`, loaded into the
`keras.applications` architecture named by `--arch`). Finer maps come from re-building the backbone's graph
from its config (a larger input, or the last stride-2 stage run at stride 1 with dilated convolutions after it,
the wsolevaluation recipe) and copying the weights over layer by layer, so every variant starts from the file.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import Any, Optional

from .files import local_fingerprint
from .graph import ModelStructureError, find_gap_head
from .opening import load_keras_model

logger = logging.getLogger(__name__)

# keras.applications builders and the input preprocessing each expects from uint8 RGB (x * scale + offset), used
# when the file brings no sidecar of its own.
APPLICATIONS = {
    "mobilenetv2": ("MobileNetV2", 1 / 127.5, -1.0),  # inputs in [-1, 1]
    "efficientnetb0": ("EfficientNetB0", 1.0, 0.0),  # rescales inside the model
    "resnet50": ("ResNet50", 1.0, 0.0),  # caffe BGR mean subtraction: a fixed 1x1 conv in front (train.py)
}

# Where each architecture's last stride-2 stage starts: the depthwise/strided layer that halves the map, and
# the layers after it whose 3x3 kernels get dilation 2 when that stride becomes 1 (`last_stride=1`). Stages to
# unfreeze in fine-tuning start at the first name present that leaves enough layers above it (see top_layers).
_LAST_STAGE = {
    "mobilenetv2": dict(pad="block_13_pad", strided="block_13_depthwise", dilate_prefixes=("block_14_", "block_15_",
                                                                                          "block_16_")),
    "resnet50": dict(pad=None, strided="conv5_block1_", dilate_prefixes=("conv5_",)),
    "efficientnetb0": dict(pad="block6a_dwconv_pad", strided="block6a_dwconv", dilate_prefixes=("block6", "block7")),
}
_UNFREEZE_FROM = {
    "mobilenetv2": ("block_13_expand", "block_10_expand", "block_6_expand"),
    "resnet50": ("conv5_block1_1_conv", "conv4_block1_1_conv", "conv3_block1_1_conv"),
    "efficientnetb0": ("block6a_expand_conv", "block5a_expand_conv", "block4a_expand_conv"),
}
_MIN_LAYERS_ABOVE = 10  # a stage start this close to the feature map would unfreeze almost nothing


class BackboneError(ValueError):
    """A backbone file that cannot be read or has no usable feature map."""


@dataclasses.dataclass
class Backbone:
    """A backbone cut at its feature map.

    model: a flat functional Keras model, image (None, H, W, 3) float -> feature map (None, h, w, K), K > 1.
    feature_layer: the name of the layer whose output is the map.
    provenance: for the sidecar: file name, sha256 (16 hex), what kind of file, the layer cut at.
    scale, offset: the preprocessing the weights expect, from the file's sidecar when it has one.
    """

    model: Any
    feature_layer: str
    provenance: dict
    scale: Optional[float] = None
    offset: Optional[float] = None


def feature_map_of(model, feature_layer: Optional[str] = None):
    """The feature tensor to cut at: `feature_layer`'s output, else the input of the GAP head of a classifier,
    else the output of a bare backbone. Raises BackboneError when there is no 4-D map with a spatial extent."""
    if feature_layer:
        try:
            tensor = model.get_layer(feature_layer).output
        except ValueError:
            raise BackboneError(f"--feature_layer {feature_layer!r} is not a layer of the backbone file") from None
        where = f"layer {feature_layer!r}"
    else:
        out = model.outputs[0] if len(model.outputs) == 1 else None
        if out is not None and len(out.shape) == 4:
            tensor, where = out, "the model output"
        else:
            try:
                tensor, where = find_gap_head(model).feature, "the input of its GAP head"
            except ModelStructureError as exc:
                raise BackboneError(
                    f"no usable feature map: the model is neither a bare backbone (4-D output) nor a GAP "
                    f"classifier ({exc}); name the layer with --feature_layer"
                ) from None
    shape = tuple(tensor.shape)
    if len(shape) != 4 or (shape[1] is not None and shape[1] * (shape[2] or 1) < 2) or (shape[-1] or 0) < 2:
        raise BackboneError(f"no usable feature map: {where} has shape {shape}, expected (batch, h, w, channels) "
                            "with a spatial map")
    return tensor


def _producer_name(tensor) -> str:
    return tensor._keras_history.operation.name


def cut(model, feature_layer: Optional[str] = None):
    """(flat model input -> feature map, the name of the layer producing it)."""
    if len(model.inputs) != 1:
        raise BackboneError(f"expected one image input, the file's model has {len(model.inputs)}")
    feature = feature_map_of(model, feature_layer)
    import keras

    name = _producer_name(feature)
    if isinstance(model.get_layer(name), keras.Model) and not feature_layer:
        # A classifier built as input -> nested backbone -> GAP: take the backbone itself (flat, named layers).
        inner = model.get_layer(name)
        return cut(inner)
    return keras.Model(model.inputs, feature, name="backbone"), name


def load(path: str, local_path: str, arch: str, *, feature_layer: Optional[str] = None,
         sidecar: Optional[dict] = None) -> Backbone:
    """Read a backbone file (already copied to `local_path`) and cut it at its feature map.

    `.weights.h5` files hold weights only: they are loaded into `keras.applications` `arch` without its top, or,
    failing that, with its 1000-class top (a whole classifier's weights) which is then cut at its GAP input.
    Other files load with Keras safe_mode on.
    """
    import keras

    digest = local_fingerprint(local_path)
    kind = "weights" if local_path.endswith(".weights.h5") else "model"
    if kind == "weights":
        if arch not in APPLICATIONS:
            raise BackboneError(f"{path}: a weights-only file needs --arch, one of {sorted(APPLICATIONS)}")
        constructor = getattr(keras.applications, APPLICATIONS[arch][0])
        errors = []
        model = None
        for include_top in (False, True):
            candidate = constructor(include_top=include_top, weights=None)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    candidate.load_weights(local_path)
            except Exception as exc:  # Keras raises ValueError or KeyError on a layout mismatch
                errors.append(f"{'with' if include_top else 'without'} top: {exc}")
                continue
            # A partial match only warns ("... will retain their freshly-initialized weights"): refuse it.
            partial = [str(w.message) for w in caught if "Skipping" in str(w.message)
                       or "freshly-initialized" in str(w.message)]
            if partial:
                errors.append(f"{'with' if include_top else 'without'} top: {len(partial)} parts of the model "
                              f"found no weights in the file ({partial[0][:120]})")
                continue
            model = candidate
            break
        if model is None:
            raise BackboneError(f"{path}: these weights fit no {APPLICATIONS[arch][0]} (" + "; ".join(
                e.splitlines()[0][:160] for e in errors) + ")")
    else:
        try:
            model = load_keras_model(local_path, safe_mode=True)
        except ModelStructureError as exc:
            raise BackboneError(str(exc)) from None
        except Exception as exc:
            raise BackboneError(f"{path}: not a readable Keras model ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200]})") from None
    backbone, name = cut(model, feature_layer)
    side = sidecar or {}
    shape = [None if d is None else int(d) for d in backbone.outputs[0].shape[1:]]
    provenance = {"file": path, "sha256": digest, "kind": kind, "feature_layer": name,
                  "feature_map": shape, "sidecar": bool(sidecar)}
    logger.info("backbone from %s (sha256 %s): cut at %s, map %s", path, digest, name, shape)
    return Backbone(backbone, name, provenance, side.get("scale"), side.get("offset"))


def _layer_configs(config: dict) -> list[dict]:
    return config["layers"]


def rebuild(model, *, input_size: Optional[tuple[int, int]] = None, last_stride_arch: Optional[str] = None):
    """The same network at another input size and/or with its last stride-2 stage at stride 1, dilated after.

    The graph is re-made from `model.get_config()` with the input shape and the strides/dilations changed, and
    every layer's weights copied over (their shapes do not depend on either change). For MobileNetV2 the
    stride-2 `block_13_depthwise` (3x3, after an asymmetric ZeroPadding2D) becomes stride 1 with a symmetric
    1-pixel pad, and the 3x3 depthwise convolutions of blocks 14-16 get dilation 2, so each keeps the receptive
    field it had over the image while the final map doubles (7x7 -> 14x14 at 224).
    """
    import keras

    config = copy.deepcopy(model.get_config())
    layers = _layer_configs(config)
    if input_size is not None:
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
                key = "batch_shape" if "batch_shape" in layer["config"] else "batch_input_shape"
                layer["config"][key] = [shape[0], int(input_size[0]), int(input_size[1]), shape[3]]
    if last_stride_arch is not None:
        spec = _LAST_STAGE.get(last_stride_arch)
        if spec is None:
            raise BackboneError(f"--last_stride 1 is defined for {sorted(_LAST_STAGE)}, not {last_stride_arch!r}")
        names = {layer["config"]["name"]: layer for layer in layers}
        strided = [n for n in names if n.startswith(spec["strided"]) and
                   tuple(names[n]["config"].get("strides", (1, 1))) == (2, 2)]
        if not strided:
            raise BackboneError(f"--last_stride 1: no stride-2 layer {spec['strided']!r}* in this backbone "
                                "(cut before its last stage?)")
        for n in strided:  # ResNet's strided layers are 1x1 convolutions: they simply stop striding
            names[n]["config"]["strides"] = [1, 1]
        if spec["pad"] and spec["pad"] in names:
            # The asymmetric pad in front of a stride-2 "valid" convolution becomes the symmetric "same" pad.
            k = max(names[strided[0]]["config"]["kernel_size"])
            names[spec["pad"]]["config"]["padding"] = [[(k - 1) // 2] * 2] * 2
        for n, layer in names.items():
            cfg = layer["config"]
            if (n.startswith(spec["dilate_prefixes"]) and "kernel_size" in cfg
                    and max(cfg["kernel_size"]) > 1 and n not in strided):
                cfg["dilation_rate"] = [2, 2]
                cfg["padding"] = "same"
    new = keras.Model.from_config(config)
    for layer in model.layers:
        if layer.weights:
            new.get_layer(layer.name).set_weights(layer.get_weights())
    return new


def top_layers(backbone_model, arch: str, unfreeze_from: Optional[str] = None) -> list:
    """The layers to unfreeze in the second phase: from `unfreeze_from` (or the latest stage start of `arch`
    with at least 10 layers above it; the top third of the layers for an unknown arch) to the feature map.
    BatchNormalization layers stay frozen: they run in inference mode, as in Keras's fine-tuning guide."""
    names = [layer.name for layer in backbone_model.layers]
    start = None
    if unfreeze_from:
        if unfreeze_from not in names:
            raise BackboneError(f"--unfreeze_from {unfreeze_from!r} is not a layer of the backbone")
        start = names.index(unfreeze_from)
    else:
        for candidate in _UNFREEZE_FROM.get(arch, ()):
            if candidate in names and len(names) - names.index(candidate) >= _MIN_LAYERS_ABOVE:
                start = names.index(candidate)
                break
        if start is None:
            start = (2 * len(names)) // 3
            logger.warning("fine-tuning the top third of the backbone (from layer %s)", names[start])
    return [layer for layer in backbone_model.layers[start:]
            if layer.weights and type(layer).__name__ != "BatchNormalization"]
