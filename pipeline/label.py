"""`weakloc label`: the nightly job. Read -> decode -> batched CAM inference -> boxes -> Parquet + summary.

    weakloc label --input 'gs://bucket/shards/train-*.tfrecord' --model gs://bucket/models/cls.keras \
                  --output gs://bucket/weak_labels/2026-11-25 [--runner DataflowRunner ...]

Any flag that is not weakloc's is a Beam pipeline option and passes through unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional, TextIO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from weakloc.models.schema import failure_row
from weakloc.transforms.coloc import Colocalize
from weakloc.transforms.decode import DecodeDoFn
from weakloc.transforms.inference import CamModelHandler, forget_model, remember_model
from weakloc.transforms.read import ReadInputs
from weakloc.transforms.tags import FAILURES, NAMESPACE, SKIPPED
from weakloc.transforms.write import WriteOutputs, publish_json

from . import engine, options, results
from .progress import Progress, steady_throughput, weakloc_metrics
from .args import Parser

logger = logging.getLogger(__name__)


_INFERENCE_FAILURES = Metrics.counter(NAMESPACE, "inference_failures")


def _failed_batch_rows(failed):
    """RunInference's dead letter -> one failure row per image of the batch.

    Beam hands (batch, (exception type, repr, traceback lines)); an exception object is accepted too.
    """
    batch, err = failed
    _INFERENCE_FAILURES.inc(len(batch))
    if isinstance(err, BaseException):
        name, message = type(err).__name__, str(err)
    else:
        name, message = getattr(err[0], "__name__", str(err[0])), str(err[1])
    for item in batch:
        yield failure_row(item.meta.source, "inference", name, message, image_id=item.meta.image_id)


def _previous_ids(p: beam.Pipeline, patterns: list[str]):
    """Image ids in earlier outputs' annotation tables, as a dict-like side input (read on the workers)."""
    return beam.pvalue.AsDict(
        p
        | "PreviousOutputs" >> beam.Create(patterns)
        | "ReadPreviousIds" >> beam.io.ReadAllFromParquet(columns=["image_id"])
        | "PreviousIdKeys" >> beam.Map(lambda row: (row["image_id"], None))
    )


def build(p: beam.Pipeline, config: options.LabelConfig):
    """Add the labeling steps to `p`; returns the PCollection holding the summary path once written."""
    skip_ids = _previous_ids(p, config.skip_patterns) if config.skip_patterns else None
    read = p | "Read" >> ReadInputs(
        config.inputs, config.input_format, folder_labels=config.folder_labels, max_file_bytes=config.max_file_bytes,
        skip_ids=skip_ids,
    )
    decode_fn = DecodeDoFn(
        config.spec.input_size,
        config.box_class_names,
        max_pixels=config.max_pixels,
        label_offset=config.label_offset,
        threads=config.decode_threads,
        # Two batches ahead: one for the forward pass about to start, one decoding while it runs.
        window=2 * config.batch_size,
    )
    side = {"skip_ids": skip_ids} if skip_ids is not None else {}
    decoded = read["inputs"] | "Decode" >> beam.ParDo(decode_fn, **side).with_outputs(
        FAILURES, SKIPPED, main="images")
    if config.coloc is None:
        handler = CamModelHandler(config.spec, config.box, batch_size=config.batch_size)
        annotated, dead = decoded.images | "CamInference" >> RunInference(handler).with_exception_handling()
        dead_batches, late = dead.failed_inferences, ()
    else:
        annotated, dead_batches, boxing = decoded.images | "Colocalize" >> Colocalize(
            config.spec, config.box, config.coloc, batch_size=config.batch_size, output=config.output)
        late = (boxing,)
    failures = (
        read[FAILURES],
        decoded[FAILURES],
        dead_batches | "FailedBatches" >> beam.FlatMap(_failed_batch_rows),
        *late,
    ) | "AllFailures" >> beam.Flatten()
    # Everything that entered: records and files read, plus image files skipped unread (already labelled).
    entered = (
        read["inputs"] | "InputEntered" >> beam.Map(lambda _: 1),
        read[SKIPPED] | "SkippedEntered" >> beam.Map(lambda _: 1),
    ) | "AllEntered" >> beam.Flatten()
    skipped = (read[SKIPPED], decoded[SKIPPED]) | "AllSkipped" >> beam.Flatten()
    return (annotated, failures, entered, skipped) | "Write" >> WriteOutputs(
        config.output, config.header(), emit_cams=config.box.emit_cams, num_shards=config.num_shards
    )


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        # No prefix matching (Parser's rule): Beam's --labels would be taken for --labels_from_folder.
        "weakloc label",
        description="Label images with CAM boxes. Flags not listed here are Beam pipeline options "
        "(--runner, --direct_num_workers, --project, --region, --temp_location, --setup_file, ...).",
    )
    options.add_label_args(ap)
    engine.add_engine_args(ap)
    return ap


# Runners whose workers (in their default, in-memory mode) run in the launching process: they can take the model
# that launch-time validation loaded (transforms/inference.py). Others get it from the model file.
_IN_PROCESS_RUNNERS = (None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def _workers_in_this_process(pipeline_options: PipelineOptions) -> bool:
    runner = pipeline_options.view_as(StandardOptions).runner
    mode = pipeline_options.view_as(DirectOptions).direct_running_mode
    return runner in _IN_PROCESS_RUNNERS and mode != "multi_processing"


def prepare(argv: Optional[list[str]] = None, test_pipeline: Optional[beam.Pipeline] = None):
    """Parse, validate and build; returns (config, pipeline) ready to run."""
    ap = parser()
    args, beam_args = ap.parse_known_args(argv)
    options.check_beam_args(beam_args, known=ap.option_strings())
    pipeline_options = PipelineOptions(beam_args)
    # Launch-time checks read s3:// (endpoint, credentials) and gs:// with the job's own filesystem options.
    FileSystems.set_options(pipeline_options)
    config, method = options.validate(args, runner=options.remote_runner(pipeline_options))
    choice = engine.for_method(args, config.spec, method, pipeline_options)
    config = dataclasses.replace(config, spec=dataclasses.replace(config.spec, converted=choice.converted),
                                 engine=choice.to_json())
    # Workers in this process take the method built at launch instead of loading the file again (TensorFlow's;
    # a converted graph is compiled by the workers, from the file they would get on any runner).
    keep = _workers_in_this_process(pipeline_options) and choice.converted is None
    remember_model(config.spec, method if keep else None)
    if config.overwrite:
        options.remove_previous_outputs(config.output)
    # Workers unpickle DoFns that live in the weakloc package: keep the main session out of it.
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=pipeline_options)
    build(p, config)
    return config, p


def start(argv: Optional[list[str]] = None, test_pipeline: Optional[beam.Pipeline] = None):
    """Prepare and hand the pipeline to its runner; returns (config, PipelineResult).

    A synchronous runner (the local FnApiRunner) returns when the job is over; others (portable, Dataflow)
    return at once with a running job.
    """
    config, p = prepare(argv, test_pipeline)
    try:
        return config, p.run()
    finally:
        forget_model()


class JobLostError(results.IncompleteRunError):
    """The runner (a portable job service, Flink, Spark) stopped answering before the job ended."""


def _runner_lost(exc: BaseException) -> bool:
    """A gRPC error from the job service: the job's state can no longer be known (its stream was removed)."""
    import grpc

    return isinstance(exc, grpc.RpcError) or isinstance(exc.__cause__, grpc.RpcError)


def _rpc_reason(exc: BaseException) -> str:
    err = exc if hasattr(exc, "code") else exc.__cause__
    try:
        return f"{err.code().name}: {err.details()}"
    except Exception:
        return str(err).splitlines()[0][:200]


def _cancel_quietly(result) -> None:
    """Ask the runner to stop the job (it may keep a stalled job otherwise); it may not answer at all."""
    try:
        if result is not None:
            result.cancel()
    except Exception as exc:
        logger.warning("could not cancel the job: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)


def run(
    argv: Optional[list[str]] = None,
    test_pipeline: Optional[beam.Pipeline] = None,
    *,
    progress_stream: Optional[TextIO] = None,
) -> dict:
    """Parse, validate, build, run and wait; returns the summary that was written (with the job's metrics).

    Args:
      argv: command-line flags (weakloc's and Beam's).
      test_pipeline: a pipeline to build into instead of a new one (tests pass a TestPipeline).
      progress_stream: where the live progress line goes (default standard error).
    """
    config, p = prepare(argv, test_pipeline)
    allow_empty = "--allow_empty" in (argv or [])
    # Around p.run() itself: the local runner only returns from it when the job is over.
    result = None
    try:
        with Progress(progress_stream, total=_known_total(config)) as shown:
            result = p.run()
            shown.attach(result)
            result.wait_until_finish()
    except Exception as exc:
        if not _runner_lost(exc):
            raise
        _cancel_quietly(result)
        raise JobLostError(
            f"the job's runner stopped answering ({_rpc_reason(exc)}), as when a worker dies mid-run: the job did "
            f"not finish and no summary.json was written to {config.output}; rerun with --overwrite") from None
    finally:
        forget_model()
    summary_path = FileSystems.join(config.output.rstrip("/"), "summary.json")
    if not FileSystems.exists(summary_path):
        # A runner that returns before the job ends (e.g. Dataflow without waiting): nothing to report yet.
        logger.info("job submitted; summary will appear at %s", summary_path)
        return {}
    metrics = weakloc_metrics(result)
    if metrics:
        # The runner's own counts, next to the ones the pipeline computed from its outputs. summary.json is the
        # run's commit point and is never rewritten: they go to metrics.json, which results.read_summary adds.
        doc = {"metrics": metrics}
        rate = steady_throughput(metrics)
        if rate:
            doc["throughput"] = rate
            logger.info("steady loop: %.1f images/s over %d images (first batch done %.1f s after the job was built)",
                        rate["steady_images_per_s"], rate["steady_images"], rate["first_batch_done_s"])
        publish_json(FileSystems.join(config.output.rstrip("/"), results.METRICS), doc)
    summary = results.read_summary(config.output)
    why = results.emptiness(summary)
    if why and not allow_empty:
        raise results.EmptyRunError(why, render(summary))
    return summary


def _known_total(config: options.LabelConfig) -> Optional[int]:
    """Inputs to do, where the listing says it (one image per file); None for TFRecords (records uncounted)."""
    if config.input_format != "images":
        return None
    try:
        return len({m.path for pattern in config.inputs for m in FileSystems.match([pattern])[0].metadata_list})
    except Exception:
        return None


def render(summary: dict) -> str:
    """The end-of-run summary `weakloc label` prints: rows, failures, boxes per class, and where they are."""
    counts = summary.get("counts") or {}
    out = summary.get("output", "")
    files = summary.get("files") or {}
    per_class = counts.get("boxes_per_class") or {}
    top = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    classes = ", ".join(f"{k} {v}" for k, v in top[:12]) + (f", ... ({len(top)} classes)" if len(top) > 12 else "")
    failed = counts.get("failed", 0)
    stages = ", ".join(f"{k} {v}" for k, v in sorted((counts.get("failed_by_stage") or {}).items()))
    lines = [
        f"images read:     {counts.get('read', 0)}"
        + (f" ({counts['skipped_labeled']} skipped, labelled before)" if counts.get("skipped_labeled") else ""),
        f"annotated rows:  {counts.get('annotated', 0)}",
        f"failures:        {failed}" + (f" ({stages})" if failed else ""),
        f"boxes:           {counts.get('boxes', 0)}" + (f" ({classes})" if classes else ""),
        f"annotations:     {len(files.get('annotations') or [])} Parquet files in {out}",
        f"failures table:  {len(files.get('failures') or [])} Parquet files in {out}",
        f"summary:         {FileSystems.join(out.rstrip('/'), 'summary.json') if out else '?'}",
    ]
    return "\n".join(lines)
