"""What every inference engine offers the box step: a CAM method's fused forward graph, converted once at launch,
loaded on workers, returning the same `CamOutputs` as the TensorFlow path.

An engine is two halves. `convert` runs where TensorFlow is (the launcher): it takes the method's compiled
function, signature (uint8 [None, H, W, 3], int32 [None, None]) -> (scores, top classes, top scores, classes,
low-res CAMs), and writes one artifact file. `load` runs on workers and must not import TensorFlow or Keras: it
reads the artifact and returns a `Forward`, a callable on numpy batches. `EngineCam` wraps a `Forward` with the
batch checks and the `CamOutputs` contract, so `annotate.annotate_batch` never knows which engine ran.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib.util
from typing import Callable, Optional

import numpy as np

from ..cam import CamOutputs, check_batch

PRECISIONS = ("auto", "f32", "bf16")

# Whether "auto" takes bf16 where the CPU computes it natively. Measured on the shared MobileNetV2 and the 663
# shared photos (benchmarks/engine_agreement.py, BENCHMARKS.md), OpenVINO bf16 on AVX512_BF16 kept TensorFlow's
# top-1 class on 96.4% of images and box IoU >= 0.95 on 95.9% of boxes, below the 99% both need: "auto" is f32.
# bf16 stays available by name (--precision bf16) for models where it measures well.
AUTO_BF16 = False

# (images uint8 (B, H, W, 3), extra int32 (B, M)) -> (scores, top classes, top scores, classes, low-res maps
# [, feature map]).
Forward = Callable[[np.ndarray, np.ndarray], tuple]
FORWARD_OUTPUTS = 5  # the length of that tuple: what every converted graph must return
# ... and a co-localization method's graph (coloc.ColocModel) returns its feature map after them.
FEATURE_OUTPUTS = FORWARD_OUTPUTS + 1


class EngineError(RuntimeError):
    """An engine that cannot run here, or a model it cannot take; the message says what to do."""


class EngineMissingError(EngineError):
    """The engine's runtime is not installed."""


class ConversionError(EngineError):
    """The engine cannot convert this model's forward graph."""


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """A converted forward graph, as workers need it (picklable, no TensorFlow objects).

    engine: the engine's name. path: the artifact file (local or any Beam filesystem).
    fingerprint: content hash of the artifact (files.file_fingerprint), checked on every worker.
    precision: as asked ("auto" is decided on each worker by its own CPU) or fixed ("f32", "bf16").
    key: the cache key the artifact was made under (model, method options, engine version).
    input_size, num_classes: the graph's image size (H, W) and class count, for the batch checks.
    """

    engine: str
    path: str
    fingerprint: str
    precision: str
    key: str
    input_size: tuple[int, int]
    num_classes: int


class Engine(abc.ABC):
    """One inference runtime. Subclasses set `name`, `module` (what must be importable) and `install`."""

    name: str = ""
    module: str = ""
    install: str = ""
    suffix: str = ""  # artifact file name ending
    converts: bool = True  # False: runs the Keras model itself, no artifact (TensorFlow)
    methods: tuple[str, ...] = ("cam", "gradcam")  # CAM methods whose fused graph it converts

    def available(self) -> bool:
        """The runtime can be imported here (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def require(self) -> None:
        """Raise EngineMissingError, naming the install command, when the runtime is absent."""
        if not self.available():
            raise EngineMissingError(f"--engine {self.name} needs the {self.module!r} package, which is not "
                                     f"installed: {self.install}")

    @abc.abstractmethod
    def version(self) -> str:
        """The runtime's version; part of every cache key (a new runtime converts afresh)."""

    def native_precisions(self) -> tuple[str, ...]:
        """Precisions this host's CPU computes natively with this engine."""
        return ("f32",)

    def resolve_precision(self, precision: str) -> str:
        """"auto" -> bf16 where AUTO_BF16 allows it and the host computes bf16 natively, else f32; "f32" and
        "bf16" stay as asked."""
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision != "auto":
            return precision
        return "bf16" if AUTO_BF16 and "bf16" in self.native_precisions() else "f32"

    def check_method(self, method) -> None:
        """At launch, before converting: raise ConversionError for a CAM method (cam.CamMethod) whose graph this
        engine cannot run as a whole. By default the conversion itself is the judge."""
        return None

    @abc.abstractmethod
    def convert(self, forward, path: str) -> None:
        """At launch: write the artifact of `forward` (a tf.function with the CAM signature) to local `path`.

        Raises:
          ConversionError: the engine cannot take the graph; the message names the model's problem.
        """

    @abc.abstractmethod
    def load(self, data: bytes, precision: str, *, cache_dir: Optional[str] = None) -> Forward:
        """On a worker: the artifact's bytes -> a Forward compiled for this host at `precision` (f32 or bf16).

        cache_dir: a local folder for this one artifact where the engine may keep what it compiled for this host,
        so the next process on the host loads instead of compiling (None: compile every time). An engine
        without such a cache ignores it."""


class EngineCam:
    """A converted forward graph with the call and outputs of `cam.CamModel` (uint8 batch, extra ids -> CamOutputs).

    Example:
      model = EngineCam(engine.load(data, "f32"), input_size=(224, 224), num_classes=1000, engine="openvino",
                        precision="f32")
      out = model(uint8_batch)  # CamOutputs, as from CamModel
    """

    def __init__(self, forward: Forward, *, input_size, num_classes: int, engine: str, precision: str,
                 description: Optional[str] = None):
        self._forward = forward
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.num_classes = int(num_classes)
        self.engine = engine
        self.precision = precision
        self.description = description or f"{engine} ({precision})"

    def __call__(self, images: np.ndarray, extra: Optional[np.ndarray] = None) -> CamOutputs:
        """Run one batch; same contract as `cam.CamModel.__call__`."""
        images, extra = check_batch(images, extra, self.input_size, self.num_classes)
        out = self._forward(images, extra)
        scores, top_c, top_s, classes, low = out[:FORWARD_OUTPUTS]
        features = np.asarray(out[FORWARD_OUTPUTS], np.float32) if len(out) == FEATURE_OUTPUTS else None
        return CamOutputs(np.asarray(scores, np.float32), np.asarray(top_c, np.int32),
                          np.asarray(top_s, np.float32), np.asarray(classes, np.int32),
                          np.asarray(low, np.float32), self.input_size, features)
