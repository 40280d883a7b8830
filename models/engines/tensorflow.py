"""The TensorFlow engine: the method's compiled tf.function run as it is, from the Keras model on each worker.

Nothing is converted: workers load the Keras file and trace the same function (`cam.CamModel`), which is the path
weakloc always had. It is the engine for GPU workers, where TensorFlow runs the graph on the accelerator.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os

from .base import Engine, EngineError


class TensorflowEngine(Engine):
    name = "tensorflow"
    module = "tensorflow"
    install = "pip install tensorflow"
    converts = False

    def version(self) -> str:
        try:
            return importlib.metadata.version("tensorflow")
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def convert(self, forward, path: str) -> None:
        raise EngineError("the TensorFlow engine runs the Keras model itself; it has nothing to convert")

    def load(self, data: bytes, precision: str, *, cache_dir=None):
        raise EngineError("the TensorFlow engine runs the Keras model itself; it has no artifact to load")


def gpu_visible() -> bool:
    """An NVIDIA GPU is visible to this process, judged without importing TensorFlow: the driver lists a device
    and CUDA_VISIBLE_DEVICES does not hide them all."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))
