"""Converted forward graphs, made once and kept by content hash.

The key covers everything that decides the graph: the model's bytes (or, for a model built in code, its weights
and configuration), the method and its options, the preprocessing, top-k, the engine and its version, and the
source of the modules that build the graph, so a change to any of them converts afresh and nothing stale is ever
reused. Converting MobileNetV2 takes 10-15 s; a hit costs one file read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import numpy as np

from .. import cam, gradcam, graph
from .base import ConversionError, Engine, EngineCam

logger = logging.getLogger(__name__)

# Probe batch for the launch-time parity check of a new conversion: the converted graph must give the scores
# and classes TensorFlow gives, before any worker sees it.
_PROBE_IMAGES = 2
_PROBE_SEED = 0
_PROBE_ATOL = 1e-3


def default_dir() -> str:
    """$WEAKLOC_CACHE_DIR, else $XDG_CACHE_HOME/weakloc, else ~/.cache/weakloc."""
    explicit = os.environ.get("WEAKLOC_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "weakloc")


def model_digest(spec) -> str:
    """What names the model's weights: its file's content hash, or for `keras:NAME` (built in code, no file)
    the name, the weights asked for and the Keras version that builds it."""
    if spec.fingerprint:
        return spec.fingerprint
    import keras

    return f"{spec.path}@{spec.keras_weights}@keras-{keras.__version__}"


def _graph_source_digest() -> str:
    """The modules that build the fused graph: a change to them is a change to every converted graph."""
    h = hashlib.sha256()
    for module in (cam, gradcam, graph):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_key(engine: Engine, model_digest: str, options: Mapping[str, Any]) -> str:
    """32 hex digits naming one conversion: the model, the method options, the engine version, the graph code."""
    doc = {"model": model_digest, "options": dict(options), "engine": engine.name, "version": engine.version(),
           "graph_source": _graph_source_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def converted_path(engine: Engine, key: str, directory: str | None = None) -> str:
    return os.path.join(directory or default_dir(), "engines", engine.name, key + engine.suffix)


def compiled_dir(engine: Engine, fingerprint: str, directory: str | None = None) -> str:
    """The local folder where `engine` keeps what it compiled on this host from the artifact with this content
    hash (beside the converted graphs, one folder per artifact, so a new conversion never meets a stale one)."""
    return os.path.join(directory or default_dir(), "engines", engine.name, "compiled", fingerprint)


def cached_convert(engine: Engine, key: str, method, *, directory: str | None = None) -> tuple[str, bool]:
    """(path of the converted graph, whether it was already there). On a miss the graph of `method` (a
    cam.CamMethod) is converted, checked against TensorFlow on a probe batch and written atomically; on a hit
    nothing is traced or converted.

    Raises:
      ConversionError: the engine cannot convert the graph, or the conversion disagrees with TensorFlow.
    """
    engine.check_method(method)
    path = converted_path(engine, key, directory)
    if os.path.exists(path):
        logger.info("converted %s graph found in the cache: %s", engine.name, path)
        return path, True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = f"{path}.part-{os.getpid()}"
    try:
        engine.convert(fused_function(method), part)
        with open(part, "rb") as f:
            check_conversion(method, engine, f.read())
        os.replace(part, path)  # another launcher converting the same key writes the same graph
    finally:
        if os.path.exists(part):
            os.remove(part)
    logger.info("converted the forward graph to %s: %s", engine.name, path)
    return path, False


def fused_function(method):
    """The method's compiled tf.function with the CAM signature (uint8 images, int32 extra ids): `forward`, or
    for a method compiled per number of requested classes (Grad-CAM), the one for none."""
    return method.forward if method.dynamic_extra else method.function(0)


def check_conversion(method, engine: Engine, data: bytes) -> None:
    """Scores and top classes of the converted graph (f32) equal TensorFlow's on a seeded probe batch."""
    h, w = method.input_size
    images = np.random.default_rng(_PROBE_SEED).integers(0, 256, (_PROBE_IMAGES, h, w, 3), dtype=np.uint8)
    want = method(images)
    got = EngineCam(engine.load(data, "f32"), input_size=method.input_size, num_classes=method.num_classes,
                    engine=engine.name, precision="f32")(images)
    diff = float(np.abs(got.scores - want.scores).max())
    if diff > _PROBE_ATOL or got.low_res.shape != want.low_res.shape:
        raise ConversionError(f"the {engine.name} conversion disagrees with TensorFlow on a probe batch: largest "
                              f"score difference {diff:.3g} (allowed {_PROBE_ATOL}), maps {got.low_res.shape} vs "
                              f"{want.low_res.shape}")
