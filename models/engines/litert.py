"""The LiteRT engine: the fused CAM graph converted to a TFLite flatbuffer at launch, run by LiteRT's interpreter
(XNNPACK on the CPU) with one thread per core.

Conversion needs TensorFlow (`tf.lite.TFLiteConverter`, on the launcher); workers import only
`ai_edge_litert.interpreter` and never TensorFlow. Built-in TFLite ops only: a graph that would need TensorFlow's
own kernels (the Flex delegate, which the `ai-edge-litert` wheel does not ship) is refused at launch. f32 only:
LiteRT's CPU path has no bf16 arithmetic, so `--precision bf16` is refused rather than run at another precision.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import threading

import numpy as np

from .base import FORWARD_OUTPUTS, ConversionError, Engine, EngineError

logger = logging.getLogger(__name__)



def cpu_count() -> int:
    """The cores this process may run on (a container's affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LiteRtEngine(Engine):
    name = "litert"
    module = "ai_edge_litert"
    install = "pip install ai-edge-litert (or pip install 'weakloc[litert]')"
    suffix = ".tflite"
    # Grad-CAM's gradient ops are not TFLite built-ins; --engine auto runs --method gradcam on TensorFlow.
    methods = ("cam",)

    def version(self) -> str:
        """The runtime's version and the converter's (TensorFlow's): either changing converts afresh."""
        self.require()
        try:
            tf_version = importlib.metadata.version("tensorflow")
        except importlib.metadata.PackageNotFoundError:
            tf_version = "none"
        return f"{importlib.metadata.version('ai-edge-litert')}+tf-{tf_version}"

    def resolve_precision(self, precision: str) -> str:
        """"auto" and "f32" -> f32; "bf16" is refused (LiteRT's CPU kernels compute f32)."""
        precision = super().resolve_precision(precision)
        if precision != "f32":
            raise EngineError(f"--engine litert runs f32 only, got --precision {precision}: use --precision f32 "
                              "(or auto), or --engine openvino for bf16")
        return precision

    def check_method(self, method) -> None:
        # Grad-CAM traces one graph per number of requested classes (cam.CamMethod.dynamic_extra is False) and the
        # converter would take its gradient ops: a graph for no requested class would be shipped and then fail on
        # the first batch that asks for one (--classes labels|both). Refused here, at launch.
        if not method.dynamic_extra:
            raise ConversionError(f"LiteRT runs one graph for every number of requested classes, and "
                                  f"{type(method).__name__} traces one per number (--method cam runs on LiteRT)")

    def convert(self, forward, path: str) -> None:
        import tensorflow as tf

        concrete = forward.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], forward)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: workers lack it
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # the converter raises ConverterError with a multi-line MLIR report
            raise ConversionError(f"LiteRT cannot convert the forward graph: {_one_line(exc)}") from exc
        outputs = len(concrete.structured_outputs)
        if outputs != FORWARD_OUTPUTS:
            raise ConversionError(f"the converted graph has {outputs} outputs, expected {FORWARD_OUTPUTS}")
        with open(path, "wb") as f:
            f.write(flatbuffer)

    def load(self, data: bytes, precision: str, *, cache_dir=None) -> "_Interpreted":
        # LiteRT prepares its kernels on the first call; it has nothing to keep in cache_dir.
        self.require()
        if precision != "f32":
            raise EngineError(f"--engine litert runs f32 only, got precision {precision!r}")
        from ai_edge_litert.interpreter import Interpreter

        threads = cpu_count()
        try:
            probe = Interpreter(model_content=data, num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"not a TFLite model LiteRT can load: {_one_line(exc)}") from exc
        return _Interpreted(data, threads, probe)


# What the fused graph returns, in order: (dtype, rank) of scores, top classes, top scores, classes, low-res maps.
_OUTPUT_KINDS = ((np.float32, 2), (np.int32, 2), (np.float32, 2), (np.int32, 2), (np.float32, 4))


class _Interpreted:
    """A TFLite model as a Forward. One interpreter per calling thread (an interpreter is not thread-safe); its
    tensors are resized only when a batch's shape differs from the previous one (a job's fixed batch size
    allocates once, the short last batch once more)."""

    def __init__(self, data: bytes, threads: int, first):
        self._data = data
        self._threads = threads
        self._local = threading.local()
        self._local.state = [first, None]
        inputs = first.get_input_details()
        # Inputs keep the tf.function's argument names; the images are the rank-4 one.
        images = [d["index"] for d in inputs if len(d["shape_signature"]) == 4]
        if len(inputs) != 2 or len(images) != 1:
            raise EngineError(f"the TFLite model's inputs {[(d['name'], list(d['shape_signature'])) for d in inputs]}"
                              " are not (images [B, H, W, 3], extra [B, M])")
        self._inputs = (images[0], next(d["index"] for d in inputs if d["index"] != images[0]))
        # The converter names a tuple's outputs Identity, Identity_1, ... by position; the list itself is unordered.
        outputs = sorted(first.get_output_details(), key=lambda d: _output_position(d["name"]))
        kinds = tuple((d["dtype"], len(d["shape_signature"])) for d in outputs)
        if kinds != _OUTPUT_KINDS:
            raise EngineError(f"the TFLite model's outputs (dtype, rank) {kinds} are not the fused CAM graph's "
                              f"{_OUTPUT_KINDS}")
        self._outputs = tuple(d["index"] for d in outputs)

    def __call__(self, images: np.ndarray, extra: np.ndarray) -> tuple:
        state = getattr(self._local, "state", None)
        if state is None:
            from ai_edge_litert.interpreter import Interpreter

            state = self._local.state = [Interpreter(model_content=self._data, num_threads=self._threads), None]
        interpreter, shapes = state
        arrays = (np.ascontiguousarray(images, np.uint8), np.ascontiguousarray(extra, np.int32))
        if shapes != [a.shape for a in arrays]:
            for index, array in zip(self._inputs, arrays):
                interpreter.resize_tensor_input(index, array.shape, strict=True)
            interpreter.allocate_tensors()
            state[1] = [a.shape for a in arrays]
        for index, array in zip(self._inputs, arrays):
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return tuple(interpreter.get_tensor(index) for index in self._outputs)  # get_tensor copies


def _output_position(name: str) -> int:
    """'Identity' -> 0, 'Identity_3' -> 3: the converter's names for the function's outputs."""
    head, _, tail = name.rpartition("_")
    if name == "Identity":
        return 0
    if head == "Identity" and tail.isdigit():
        return int(tail)
    raise EngineError(f"unexpected output name in the TFLite model: {name!r} (expected Identity, Identity_N)")


def _one_line(exc: BaseException) -> str:
    """The converter's report, reduced to the line that names what failed."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "not supported" in line.lower() or "failed to legalize" in line.lower() or "flex" in line.lower():
            return line
    return lines[-1] if lines else type(exc).__name__
