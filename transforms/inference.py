"""Batched CAM inference as a Beam RunInference ModelHandler.

RunInference loads the model once per process (shared.Shared), batches with BatchElements and times each batch
under the `weakloc` metrics namespace; this handler stacks a batch once, runs the one compiled forward pass that
returns scores and CAMs together, and turns the whole batch into annotation rows with numpy.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from weakloc.models import annotate, zoo
from weakloc.models.cam import CamMethod
from weakloc.models.opening import ModelSpec

from .tags import BATCH_DONE, NAMESPACE

logger = logging.getLogger(__name__)


# Launch-time validation (pipeline/options.py) builds the method to check it; a runner that works in the
# launching process (the local FnApiRunner) takes that method instead of loading the file a second time, which
# cost 1.3 s of a MobileNetV2 job's 3.3 s start-up. `label.prepare` decides when to keep it. One method is kept,
# under everything that decides what it is: its path, the content hash of its bytes, the weights asked for,
# safe_mode, the whole spec and top_k. Other processes load as usual.
_REMEMBERED: list = []  # at most one (spec, top_k, method)


def _vouched(spec: ModelSpec) -> bool:
    # Without a content hash nothing vouches that the file is still the one validated (keras:NAME is built in code).
    return bool(spec.fingerprint) or zoo.is_keras_application(spec.path)


def remember_model(spec: ModelSpec, method: CamMethod | None) -> None:
    """Keep `method` (built from `spec`) for `load_cam_model` in this process, in place of any kept before;
    None keeps nothing."""
    _REMEMBERED.clear()
    if method is not None and _vouched(spec):
        _REMEMBERED.append((spec, method.top_k, method))


def forget_model() -> None:
    """Drop the remembered method (once its job has run, or when the workers are other processes)."""
    _REMEMBERED.clear()


def load_cam_model(spec: ModelSpec, top_k: int) -> CamMethod:
    """The method named by `spec`, ready to run: the one kept at launch, or opened from the spec."""
    for kept_spec, kept_k, method in _REMEMBERED:
        if kept_spec == spec and kept_k == top_k and _vouched(spec):
            logger.info("using the model validated at launch (%s)", spec.name)
            return method
    return spec.open(top_k=top_k)


class CamModelHandler(ModelHandler):
    """ModelHandler[DecodedInput, dict (annotation row), a cam.CamMethod (CamModel, GradCamModel, ...) or an
    engines.EngineCam (the same call and outputs)]."""

    def __init__(self, spec: ModelSpec, opts: annotate.BoxOptions, *, batch_size: int = 32):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.opts = opts
        self.batch_size = int(batch_size)
        self.built = time.time()  # travels with the handler to every worker: one clock origin for the job
        self._done = Metrics.distribution(NAMESPACE, BATCH_DONE)
        self._engine_counters: dict = {}

    def load_model(self):
        return load_cam_model(self.spec, self.opts.top_k)

    def run_inference(self, batch: Sequence[Any], model: CamMethod, inference_args=None) -> Iterable[dict]:
        metas = [item.meta for item in batch]
        pixels = np.stack([item.pixels for item in batch])
        extra = annotate.extra_classes(metas, self.opts)
        out = model(pixels, extra)
        rows = annotate.annotate_batch(out, metas, self.spec.class_names, self.opts, self.spec.name, extra)
        self._engine_counter(model).inc(len(batch))
        self._done.update(int(1000 * (time.time() - self.built)))
        return rows

    def _engine_counter(self, model):
        """Images run per engine and precision, as each worker decided (summary.json's metrics)."""
        name = f"images_{getattr(model, 'engine', 'tensorflow')}_{getattr(model, 'precision', 'f32')}"
        if name not in self._engine_counters:
            self._engine_counters[name] = Metrics.counter(NAMESPACE, name)
        return self._engine_counters[name]

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(item.pixels.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def batch_elements_kwargs(self):
        # A fixed size: the graph has a None batch dimension, so the short last batch of a bundle is fine.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}
