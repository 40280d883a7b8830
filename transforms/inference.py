"""Batched CAM inference as a Beam RunInference ModelHandler.

RunInference loads the model once per process (shared.Shared), batches with BatchElements and times each batch
under the `weakloc` metrics namespace; this handler stacks a batch once, runs the one compiled forward pass that
returns scores and CAMs together, and turns the whole batch into annotation rows with numpy.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import tempfile
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from weakloc.models import annotate, zoo
from weakloc.models.cam import CamModel, file_fingerprint, load_keras_model
from weakloc.models.gradcam import GradCamModel

from .read import NAMESPACE

logger = logging.getLogger(__name__)

# Distribution of each batch's end, in milliseconds since the job was built: its min and max bound the steady
# loop on every runner that reports metrics, all workers together (pipeline/progress.steady_throughput).
BATCH_DONE = "batch_done_ms"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the CAM model (picklable, no TensorFlow objects)."""

    path: str
    name: str  # file name and content hash, written into every row
    input_size: tuple[int, int]
    scale: float
    offset: float
    class_names: tuple[str, ...]
    feature_layer: Optional[str] = None
    dense_layer: Optional[str] = None
    safe_mode: bool = True
    fingerprint: str = ""  # content hash checked on every worker; "" skips the check
    method: str = "cam"  # "cam" (GAP + Dense head, one pass) or "gradcam" (any head, gradients)
    keras_weights: Optional[str] = "imagenet"  # for path "keras:NAME": "imagenet", None (random) or a file path
    flip_tta: bool = False  # average the CAMs of each picture and of its mirror image
    contrast: bool = False  # CAMs of each class's margin over the mean class (models/cam.py)


def fetch_to_local(path: str) -> str:
    """Copy a model from any Beam filesystem (gs://, s3://, local) to a local temp file; Keras needs one."""
    if os.path.exists(path):
        return path
    # Keep the whole file name: Keras tells formats apart by it (".weights.h5" is not a legacy ".h5").
    suffix = "-" + posixpath.basename(path.rstrip("/"))
    fd, local = tempfile.mkstemp(suffix=suffix, prefix="weakloc-model-")
    with os.fdopen(fd, "wb") as out, FileSystems.open(path) as src:
        while chunk := src.read(1 << 24):
            out.write(chunk)
    return local


def _fetch_checked(path: str, fingerprint: str) -> str:
    """A local copy of `path` whose content hash is `fingerprint` ("" skips the check)."""
    local = fetch_to_local(path)
    if fingerprint:
        with open(local, "rb") as f:
            found = file_fingerprint(f.read())
        if found != fingerprint:
            # Replaced between launch and this worker (a retrain mid-run): rows would name the wrong model.
            raise RuntimeError(f"{path} changed since the job started: sha256 {found}, expected {fingerprint}")
    return local


# Launch-time validation (pipeline/options.py) loads the model to check it; a runner that works in the launching
# process (the local FnApiRunner) takes that model instead of loading the file a second time, which cost 1.3 s of
# a MobileNetV2 job's 3.3 s start-up. One model is kept, under everything that decides what it is: its path,
# the content hash of its bytes, the weights asked for and safe_mode. Other processes load as usual.
_REMEMBERED: dict = {}


def _model_key(spec: ModelSpec):
    if not spec.fingerprint and not zoo.is_keras_application(spec.path):
        return None  # no content hash to vouch that the file is still the one validated
    return (spec.path, spec.fingerprint, spec.keras_weights, spec.safe_mode)


def remember_model(spec: ModelSpec, model) -> None:
    """Keep `model` (a Keras model loaded from `spec`) for `load_cam_model` in this process, in place of any
    model kept before; None keeps nothing."""
    _REMEMBERED.clear()
    key = _model_key(spec)
    if key is not None and model is not None:
        _REMEMBERED[key] = model


def forget_model() -> None:
    """Drop the remembered model (once its job has run, or when the workers are other processes)."""
    _REMEMBERED.clear()


def load_cam_model(spec: ModelSpec, top_k: int):
    """The model named by `spec`, ready to run: a CamModel, or a GradCamModel for method "gradcam"."""
    model = _REMEMBERED.get(_model_key(spec))
    if model is not None:
        logger.info("using the model validated at launch (%s)", spec.name)
    elif zoo.is_keras_application(spec.path):
        weights = spec.keras_weights
        if weights not in (None, "imagenet"):
            weights = _fetch_checked(weights, spec.fingerprint)
        model, _ = zoo.build(spec.path, weights=weights)
    else:
        model = load_keras_model(_fetch_checked(spec.path, spec.fingerprint), safe_mode=spec.safe_mode)
    common = dict(input_size=spec.input_size, scale=spec.scale, offset=spec.offset, top_k=top_k,
                  feature_layer=spec.feature_layer)
    if spec.method == "gradcam":
        return GradCamModel(model, **common)
    return CamModel(model, dense_layer=spec.dense_layer, flip_tta=spec.flip_tta, contrast=spec.contrast, **common)


class CamModelHandler(ModelHandler):
    """ModelHandler[DecodedInput, dict (annotation row), CamModel or GradCamModel (same call and outputs)]."""

    def __init__(self, spec: ModelSpec, opts: annotate.BoxOptions, *, batch_size: int = 32):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.opts = opts
        self.batch_size = int(batch_size)
        self.built = time.time()  # travels with the handler to every worker: one clock origin for the job
        self._done = Metrics.distribution(NAMESPACE, BATCH_DONE)

    def load_model(self):
        return load_cam_model(self.spec, self.opts.top_k)

    def run_inference(self, batch: Sequence[Any], model: CamModel, inference_args=None) -> Iterable[dict]:
        metas = [item.meta for item in batch]
        pixels = np.stack([item.pixels for item in batch])
        extra = annotate.extra_classes(metas, self.opts)
        out = model(pixels, extra)
        rows = annotate.annotate_batch(out, metas, self.spec.class_names, self.opts, self.spec.name, extra)
        self._done.update(int(1000 * (time.time() - self.built)))
        return rows

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(item.pixels.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def batch_elements_kwargs(self):
        # A fixed size: the graph has a None batch dimension, so the short last batch of a bundle is fine.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}
