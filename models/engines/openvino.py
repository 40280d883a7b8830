"""The OpenVINO engine: the fused CAM graph converted to OpenVINO IR at launch, compiled for the worker's CPU.

Workers import only `openvino` (about 180 MB installed, against TensorFlow's 1.9 GB) and never TensorFlow: the
artifact is the IR's XML and weights packed in one uncompressed tar file, read from memory. bf16 is used where
the CPU computes it natively (AMX, AVX512_BF16) and asked for; elsewhere f32.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
import threading

import numpy as np

from .base import FEATURE_OUTPUTS, FORWARD_OUTPUTS, ConversionError, Engine, EngineError

logger = logging.getLogger(__name__)

_XML, _BIN = "model.xml", "model.bin"


class OpenVinoEngine(Engine):
    name = "openvino"
    module = "openvino"
    install = "pip install openvino (or pip install 'weakloc[openvino]')"
    suffix = ".ovir.tar"
    # Forward-only graphs: Grad-CAM's gradient ops (BiasAddGrad, Conv2DBackpropFilter, ReluGrad) have no
    # conversion rule in OpenVINO 2026.4, so --engine auto runs --method gradcam on TensorFlow. Co-localization's
    # graph is CAM's with the feature map as one more output.
    methods = ("cam", "coloc", "fused")

    def __init__(self):
        self._core = None

    def _ov(self):
        self.require()
        import openvino

        return openvino

    def core(self):
        """One openvino.Core per process (it holds the plugin and its caches)."""
        if self._core is None:
            self._core = self._ov().Core()
        return self._core

    def version(self) -> str:
        return self._ov().get_version()

    def native_precisions(self) -> tuple[str, ...]:
        caps = self.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return ("f32", "bf16") if "BF16" in caps else ("f32",)

    def convert(self, forward, path: str) -> None:
        ov = self._ov()
        try:
            model = ov.convert_model(forward.get_concrete_function())
        except Exception as exc:  # the converter raises its own types, with a multi-line report
            raise ConversionError(f"OpenVINO cannot convert the forward graph: {_one_line(exc)}") from exc
        if len(model.outputs) not in (FORWARD_OUTPUTS, FEATURE_OUTPUTS):
            raise ConversionError(f"the converted graph has {len(model.outputs)} outputs, expected {FORWARD_OUTPUTS} "
                                  f"(or {FEATURE_OUTPUTS} with the feature map)")
        with tempfile.TemporaryDirectory(prefix="weakloc-ov-") as tmp:
            # Weights stay f32 in the file: the precision is chosen when a worker compiles, for its own CPU.
            ov.save_model(model, os.path.join(tmp, _XML), compress_to_fp16=False)
            with tarfile.open(path, "w") as tar:
                for name in (_XML, _BIN):
                    info = tar.gettarinfo(os.path.join(tmp, name), arcname=name)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with open(os.path.join(tmp, name), "rb") as f:
                        tar.addfile(info, f)

    def load(self, data: bytes, precision: str, *, cache_dir: str | None = None) -> "_Compiled":
        ov = self._ov()
        if precision not in ("f32", "bf16"):
            raise EngineError(f"precision must be f32 or bf16 when compiling, got {precision!r}")
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                xml = tar.extractfile(_XML).read()
                weights = tar.extractfile(_BIN).read()
        except (tarfile.TarError, KeyError, AttributeError) as exc:
            raise EngineError(f"not a weakloc OpenVINO artifact ({_XML} + {_BIN} in a tar file): {exc}") from exc
        core = self.core()
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
        # LATENCY: one stream with every core on the batch, as TensorFlow runs it; the batch is already 32 images.
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if cache_dir is None:
            return _Compiled(core.compile_model(model, "CPU", config))
        # OpenVINO's own compiled-model cache: the plugin's graph, as compiled for this CPU and precision, kept in
        # a blob named by OpenVINO's hash of the graph and the config, so the next worker on this host imports it
        # (0.08 s against 0.2-0.3 s for MobileNetV2). A blob it cannot read is dropped and compiled afresh.
        try:
            return _Compiled(core.compile_model(model, "CPU", {**config, "CACHE_DIR": cache_dir}))
        except RuntimeError as exc:  # the folder cannot be made or written: compile as without a cache
            logger.warning("OpenVINO cannot use %s as its compiled-model cache, compiling without it: %s",
                           cache_dir, _one_line(exc))
            return _Compiled(core.compile_model(model, "CPU", config))


class _Compiled:
    """A compiled model as a Forward; one infer request per calling thread (a request is not thread-safe)."""

    def __init__(self, compiled):
        self._compiled = compiled
        self._outputs = len(compiled.outputs)  # FORWARD_OUTPUTS, or FEATURE_OUTPUTS with the feature map
        self._local = threading.local()
        # True when OpenVINO imported the graph from its cache folder instead of compiling it.
        self.loaded_from_cache = bool(compiled.get_property("LOADED_FROM_CACHE"))

    def __call__(self, images: np.ndarray, extra: np.ndarray) -> tuple:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        request.infer([images, extra])
        # Copies: the request's output buffers are overwritten by its next batch.
        return tuple(np.array(request.get_output_tensor(i).data) for i in range(self._outputs))


def _one_line(exc: BaseException) -> str:
    """The converter's report, reduced to the line that names what failed."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "No conversion rule" in line or "not supported" in line.lower():
            return line
    return lines[-1] if lines else type(exc).__name__
