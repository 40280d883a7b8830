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

# How a worker runs its batches. "throughput": OpenVINO's THROUGHPUT hint (one stream per core or two, each on
# its own threads) fed by an AsyncInferQueue of its optimal number of requests, the batch cut into sub-batches of
# SUB_BATCH images; "latency": one stream with every core on the whole batch, as TensorFlow runs it. The engine's
# outputs are the same either way (every output is per image); only the speed differs (BENCHMARKS.md).
# WEAKLOC_OPENVINO_HINT overrides it on a worker, for the benchmark that compares the two.
HINTS = ("throughput", "latency")
DEFAULT_HINT = "throughput"
SUB_BATCH = 4


def hint() -> str:
    chosen = os.environ.get("WEAKLOC_OPENVINO_HINT", DEFAULT_HINT).lower()
    if chosen not in HINTS:
        raise EngineError(f"WEAKLOC_OPENVINO_HINT must be one of {HINTS}, got {chosen!r}")
    return chosen


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
        mode = hint()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": mode.upper()}
        if cache_dir is None:
            return _Compiled(core.compile_model(model, "CPU", config), mode)
        # OpenVINO's own compiled-model cache: the plugin's graph, as compiled for this CPU and precision, kept in
        # a blob named by OpenVINO's hash of the graph and the config, so the next worker on this host imports it
        # (0.08 s against 0.2-0.3 s for MobileNetV2). A blob it cannot read is dropped and compiled afresh.
        try:
            return _Compiled(core.compile_model(model, "CPU", {**config, "CACHE_DIR": cache_dir}), mode)
        except RuntimeError as exc:  # the folder cannot be made or written: compile as without a cache
            logger.warning("OpenVINO cannot use %s as its compiled-model cache, compiling without it: %s",
                           cache_dir, _one_line(exc))
            return _Compiled(core.compile_model(model, "CPU", config), mode)


class _Compiled:
    """A compiled model as a Forward. "latency": one infer request per calling thread (a request is not
    thread-safe) on the whole batch. "throughput": per calling thread, an AsyncInferQueue of the compiled model's
    optimal number of requests, each taking SUB_BATCH images of the batch, reassembled in order."""

    def __init__(self, compiled, mode: str = "latency", sub_batch: int = SUB_BATCH):
        self._compiled = compiled
        self.mode = mode
        self.sub_batch = int(sub_batch)
        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if mode == "throughput" else 1
        self._outputs = len(compiled.outputs)  # FORWARD_OUTPUTS, or FEATURE_OUTPUTS with the feature map
        self._local = threading.local()
        # True when OpenVINO imported the graph from its cache folder instead of compiling it.
        self.loaded_from_cache = bool(compiled.get_property("LOADED_FROM_CACHE"))

    def _outputs_of(self, request) -> tuple:
        # Copies: a request's output buffers are overwritten by its next inference.
        return tuple(np.array(request.get_output_tensor(i).data) for i in range(self._outputs))

    def __call__(self, images: np.ndarray, extra: np.ndarray) -> tuple:
        if self.mode == "latency" or self.requests < 2 or len(images) <= self.sub_batch:
            request = getattr(self._local, "request", None)
            if request is None:
                request = self._local.request = self._compiled.create_infer_request()
            request.infer([images, extra])
            return self._outputs_of(request)
        queue = getattr(self._local, "queue", None)
        if queue is None:
            import openvino

            queue = self._local.queue = openvino.AsyncInferQueue(self._compiled, self.requests)
        starts = range(0, len(images), self.sub_batch)
        parts: list = [None] * len(starts)

        def done(request, index):
            parts[index] = self._outputs_of(request)

        queue.set_callback(done)
        for index, start in enumerate(starts):
            end = start + self.sub_batch
            queue.start_async([images[start:end], extra[start:end]], userdata=index)
        queue.wait_all()
        return tuple(np.concatenate([part[i] for part in parts]) for i in range(self._outputs))


def _one_line(exc: BaseException) -> str:
    """The converter's report, reduced to the line that names what failed."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "No conversion rule" in line or "not supported" in line.lower():
            return line
    return lines[-1] if lines else type(exc).__name__
