"""Models users already have: `keras.applications` ImageNet classifiers by name (`--model keras:MobileNetV2`).

The architecture's own `preprocess_input` is put inside the model, so weakloc feeds it plain RGB 0..255
(scale 1, offset 0) whatever the architecture expects (ResNet's BGR mean subtraction cannot be written as one
scale and offset). The 1000 ImageNet class names ship with weakloc (imagenet_classes.tsv), since Keras's own
`decode_predictions` downloads them at run time.
"""
from __future__ import annotations

import functools
import inspect
import logging
import pathlib

from .sidecar import Preprocessing

logger = logging.getLogger(__name__)

PREFIX = "keras:"
IMAGENET_SIZE = (224, 224)
_NAMES_FILE = pathlib.Path(__file__).with_name("imagenet_classes.tsv")


class ZooError(ValueError):
    """An unknown architecture name, or weights that cannot be had (offline, bad file)."""


def is_keras_application(model: str) -> bool:
    return model.startswith(PREFIX)


def available() -> list[str]:
    """The classifier constructors this Keras offers (MobileNetV2, ResNet50, EfficientNetB0, ...)."""
    import keras

    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def architecture(model: str) -> str:
    """`keras:MobileNetV2` -> `MobileNetV2`, checked against what keras.applications has.

    Raises:
      ZooError: the name is not a keras.applications constructor (the message lists the ones that are).
    """
    name = model[len(PREFIX):] if is_keras_application(model) else model
    names = available()
    if name not in names:
        raise ZooError(f"--model {model!r}: {name!r} is not in keras.applications; one of {names}")
    return name


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k names in model output order (`tench`, `goldfish`, ..., `toilet_tissue`)."""
    rows = [line.split("\t") for line in _NAMES_FILE.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")]
    return tuple(name for _, name in rows)


def build(model: str, *, weights: str | None = "imagenet"):
    """Build a keras.applications classifier (include_top) with its preprocessing inside.

    Args:
      model: `keras:NAME` or `NAME`.
      weights: "imagenet" (downloaded by Keras once into ~/.keras/models), None for random weights, or a local
        path to a weights file of the same architecture.

    Returns:
      (keras model taking RGB float 0..255 at its default input size, Preprocessing with scale 1, offset 0, the
      ImageNet class names when the model has 1000 outputs, else class_i with a warning).

    Raises:
      ZooError: unknown name, or the weights could not be downloaded or read.
    """
    import keras

    name = architecture(model)
    constructor = getattr(keras.applications, name)
    preprocess = getattr(inspect.getmodule(constructor), "preprocess_input", None)
    size = default_input_size(name)
    # keras.applications' own `input_tensor` argument builds the classifier on top of our preprocessing in one
    # flat graph, so the GAP head stays a top-level layer that find_gap_head can walk to.
    inp = keras.Input((*size, 3), name="rgb_0_255")
    x = keras.layers.Lambda(preprocess, name=f"{name.lower()}_preprocess")(inp) if preprocess else inp
    try:
        model_out = constructor(weights=weights, input_tensor=x)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            raise ZooError(
                f"cannot get the ImageNet weights of {name} ({exc}). Keras downloads them once into "
                "~/.keras/models (or $KERAS_HOME/models); without network, copy the file there, or pass "
                "--keras_weights with a local or gs:// copy (--keras_weights none gives random weights, for tests)"
            ) from exc
        raise ZooError(f"cannot build {name} with weights {weights!r}: {exc}") from exc
    num_classes = int(model_out.outputs[0].shape[-1])
    names = imagenet_class_names()
    if num_classes != len(names):
        logger.warning("%s has %d outputs, not the 1000 ImageNet classes; naming them class_0..class_%d",
                       name, num_classes, num_classes - 1)
        names = tuple(f"class_{i}" for i in range(num_classes))
    prep = Preprocessing(
        input_size=size,
        scale=1.0,
        offset=0.0,
        class_names=names,
        extra={"keras_application": name, "preprocessing": f"{name}'s preprocess_input, inside the model",
               "weights": weights if weights is None or weights == "imagenet" else "file"},
    )
    return model_out, prep


@functools.lru_cache(maxsize=None)
def default_input_size(name: str) -> tuple[int, int]:
    """The (H, W) an ImageNet `name` classifier is built for (224 for most; 299, 331, 240...600 for others).

    Read from a weightless build, since each constructor keeps its default to itself. Architectures that accept
    any size (MobileNetV3, ConvNeXt) get 224, the ImageNet crop they were trained at.
    """
    import keras

    shape = getattr(keras.applications, name)(weights=None).input_shape
    if shape[1] is None or shape[2] is None:
        return IMAGENET_SIZE
    return int(shape[1]), int(shape[2])
