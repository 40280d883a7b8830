"""Inference engines for the fused CAM graph: TensorFlow (the Keras model itself), OpenVINO and LiteRT (converted
at launch). `base.Engine` is the whole interface; each converted engine is one subclass registered here, and the
box step never changes."""
from __future__ import annotations

import logging
import time

from .base import (  # noqa: F401  the package's interface
    PRECISIONS,
    ConversionError,
    ConvertedModel,
    Engine,
    EngineCam,
    EngineError,
    EngineMissingError,
)
from .litert import LiteRtEngine
from .openvino import OpenVinoEngine
from .tensorflow import TensorflowEngine, gpu_visible  # noqa: F401

logger = logging.getLogger(__name__)

ENGINES = ("auto", "tensorflow", "openvino", "litert")
_REGISTRY = {"tensorflow": TensorflowEngine, "openvino": OpenVinoEngine, "litert": LiteRtEngine}
_INSTANCES: dict[str, Engine] = {}


def get(name: str) -> Engine:
    """The engine called `name` (one instance per process: OpenVINO's Core is made once)."""
    if name not in _REGISTRY:
        raise EngineError(f"engine must be one of {tuple(_REGISTRY)}, got {name!r}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def choose(requested: str, *, gpu: bool) -> tuple[Engine, str]:
    """(engine, why) for --engine `requested`: "auto" takes TensorFlow where the workers have a GPU, else
    OpenVINO where it is installed, else TensorFlow. A named engine must be installed.

    Raises:
      EngineMissingError: the named engine's runtime is absent (the message names the install command).
    """
    if requested not in ENGINES:
        raise EngineError(f"--engine must be one of {ENGINES}, got {requested!r}")
    if requested != "auto":
        engine = get(requested)
        engine.require()
        return engine, "asked for"
    if gpu:
        return get("tensorflow"), "auto: the workers have a GPU"
    if get("openvino").available():
        return get("openvino"), "auto: CPU workers and OpenVINO is installed"
    return get("tensorflow"), "auto: OpenVINO is not installed (pip install openvino)"


def open_converted(converted: ConvertedModel) -> EngineCam:
    """A graph converted at launch, fetched with its hash checked and compiled on its engine (what a worker
    does); TensorFlow is never imported.

    Raises:
      EngineMissingError: the engine is not installed here. RuntimeError: the file changed since launch.
    """
    from ..files import fetch_checked
    from .cache import compiled_dir

    engine = get(converted.engine)
    engine.require()
    started = time.perf_counter()
    with open(fetch_checked(converted.path, converted.fingerprint), "rb") as f:
        data = f.read()
    precision = engine.resolve_precision(converted.precision)
    forward = engine.load(data, precision, cache_dir=compiled_dir(engine, converted.fingerprint))
    model = EngineCam(forward, input_size=converted.input_size, num_classes=converted.num_classes,
                      engine=engine.name, precision=precision)
    how = "loaded from this host's compiled cache" if getattr(forward, "loaded_from_cache", False) else "compiled"
    logger.info("%s graph %s at %s in %.2f s (%s)", engine.name, how, precision, time.perf_counter() - started,
                converted.path)
    return model
