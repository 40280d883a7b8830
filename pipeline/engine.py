"""`--engine` and `--precision`: which runtime runs the CAM graph, decided and prepared once at launch.

For OpenVINO and LiteRT the method's fused forward graph is converted here (or found in the cache by content hash), checked
against TensorFlow on a probe batch, and shipped to workers under --temp_location as the model file is; workers
check its hash and never import TensorFlow. A model the engine cannot convert fails here with one line, or, with
`--engine auto`, runs on TensorFlow after a warning. Never on a worker.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import posixpath
from typing import Any, Callable, Optional

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions, StandardOptions

from weakloc.models import engines
from weakloc.models.engines import cache
from weakloc.models.files import local_fingerprint

from . import interrupt, options

logger = logging.getLogger(__name__)

# Runners whose workers read the launcher's local files (the converted graph can stay in the local cache).
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
SHIPPED_DIR = "weakloc-engines"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference engine")
    group.add_argument("--engine", choices=engines.ENGINES, default="auto",
                       help="runtime of the CAM graph: openvino or litert (converted at launch, cached; workers "
                            "need no TensorFlow; litert is f32 only), tensorflow, or auto (default): TensorFlow "
                            "where the workers have a GPU, else OpenVINO where installed")
    group.add_argument("--precision", choices=engines.PRECISIONS, default="auto",
                       help="OpenVINO arithmetic: f32, bf16 (fast where the CPU has AMX/AVX512_BF16, but it "
                            "moves boxes: see BENCHMARKS.md), or auto (default: f32, as measured)")


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """What ran the graph, for the run log and summary.json."""

    engine: str
    precision: str
    requested: str
    precision_requested: str
    reason: str
    converted: Optional[engines.ConvertedModel] = None
    cache_hit: Optional[bool] = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.engine, "precision": self.precision, "requested": self.requested,
                "precision_requested": self.precision_requested, "reason": self.reason,
                "version": engines.get(self.engine).version(), "cache_hit": self.cache_hit,
                "converted": self.converted.path if self.converted else None,
                "converted_sha256_16": self.converted.fingerprint if self.converted else None}


def workers_have_gpu(beam_options: Optional[PipelineOptions]) -> bool:
    """Dataflow workers asked for an accelerator, or local workers on a host with a visible GPU."""
    if beam_options is None:
        return engines.gpu_visible()
    asked = [*(beam_options.view_as(GoogleCloudOptions).dataflow_service_options or []),
             *(beam_options.view_as(DebugOptions).experiments or [])]
    if any("worker_accelerator" in str(a) for a in asked):
        return True
    runner = beam_options.view_as(StandardOptions).runner
    return engines.gpu_visible() if runner in LOCAL_RUNNERS else False


def method_options(spec, top_k: int) -> dict[str, Any]:
    """Everything besides the weights that decides the fused graph (part of the conversion's cache key)."""
    return {"method": spec.method, "input_size": list(spec.input_size), "scale": spec.scale, "offset": spec.offset,
            "top_k": int(top_k), "feature_layer": spec.feature_layer, "dense_layer": spec.dense_layer,
            "flip_tta": spec.flip_tta, "contrast": spec.contrast, "tta_scales": list(spec.tta_scales),
            "coloc_layer": spec.coloc_layer}


def choose(args, method, *, model_digest: Callable[[], str], options: dict[str, Any], gpu: bool) -> EngineChoice:
    """Pick the engine for --engine/--precision and, for a converting engine, convert (or find) the graph.

    method: the CAM method built at launch (cam.CamMethod), whose forward graph is converted on a cache miss.
    model_digest: () -> what names the model's weights (cache.model_digest).

    Raises:
      engines.EngineError: a named engine that is not installed or cannot convert the model.
    """
    engine, reason = engines.choose(args.engine, gpu=gpu)
    if not engine.converts:
        if args.precision == "bf16":
            raise engines.EngineError("--precision bf16 is for --engine openvino; TensorFlow runs the model in f32")
        return EngineChoice("tensorflow", "f32", args.engine, args.precision, reason)
    if args.engine == "auto" and options["method"] not in engine.methods:
        reason = f"auto: {engine.name} does not convert --method {options['method']}"
        return EngineChoice("tensorflow", "f32", args.engine, args.precision, reason)
    precision = engine.resolve_precision(args.precision)
    if precision == "bf16" and "bf16" not in engine.native_precisions():
        logger.warning("--precision bf16 on a CPU without native bf16 (AMX/AVX512_BF16): expect it to be slow")
    key = cache.cache_key(engine, model_digest(), options)
    try:
        path, hit = cache.cached_convert(engine, key, method)
    except engines.ConversionError as exc:
        if interrupt.INTERRUPTED.is_set():  # Ctrl-C during the conversion: stop, never fall back and go on
            raise KeyboardInterrupt from None
        if args.engine != "auto":
            raise engines.ConversionError(f"--engine {engine.name}: {exc}; run it with --engine tensorflow") from exc
        logger.warning("--engine auto: %s; running on TensorFlow instead", exc)
        return EngineChoice("tensorflow", "f32", args.engine, args.precision, f"auto: {exc}")
    fingerprint = local_fingerprint(path)
    converted = engines.ConvertedModel(engine.name, path, fingerprint, args.precision, key,
                                       tuple(options["input_size"]), int(method.num_classes))
    return EngineChoice(engine.name, precision, args.engine, args.precision, reason, converted, hit)


def ship(choice: EngineChoice, beam_options: Optional[PipelineOptions]) -> EngineChoice:
    """Copy the converted graph under --temp_location for workers that cannot read this machine's files.

    Raises:
      engines.EngineError: remote workers and no --temp_location to ship it through.
    """
    if choice.converted is None or beam_options is None:
        return choice
    # Workers that see this machine's files (the local runners, a portable runner's LOOPBACK workers) read the
    # cached graph where it is.
    runner = options.remote_runner(beam_options)
    if runner is None:
        return choice
    temp = beam_options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise engines.EngineError(f"--engine {choice.engine} ships the converted graph to {runner} workers under "
                                  "--temp_location: pass one (gs://...), or --engine tensorflow")
    dest = FileSystems.join(temp, SHIPPED_DIR, posixpath.basename(choice.converted.path))
    if not FileSystems.exists(dest):
        with open(choice.converted.path, "rb") as src, FileSystems.create(dest) as out:
            out.write(src.read())
    logger.info("converted graph shipped to %s", dest)
    return dataclasses.replace(choice, converted=dataclasses.replace(choice.converted, path=dest))


def log_choice(choice: EngineChoice) -> None:
    logger.info("engine: %s (%s; precision %s)%s", choice.engine, choice.reason, choice.precision,
                "" if choice.converted is None else
                f", converted graph {'from the cache' if choice.cache_hit else 'made now'}: {choice.converted.path}")


def for_method(args, spec, method, beam_options: Optional[PipelineOptions] = None) -> EngineChoice:
    """The engine for a method built at launch from `spec` (`label`, `calibrate`): its graph converted, or
    found in the cache, and shipped where the workers read it. Logged."""
    choice = choose(args, method, model_digest=lambda: cache.model_digest(spec),
                    options=method_options(spec, method.top_k), gpu=workers_have_gpu(beam_options))
    choice = ship(choice, beam_options)
    log_choice(choice)
    return choice


def in_process(args, spec, method):
    """(what runs the graph here, EngineChoice) for a command that runs the method itself (`calibrate`): the
    converted graph on its engine, or the TensorFlow method as built."""
    choice = for_method(args, spec, method)
    if choice.converted is None:
        return method, choice
    return engines.open_converted(choice.converted), choice
