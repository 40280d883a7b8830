"""`weakloc label`: the nightly job. Read -> decode -> batched CAM inference -> boxes -> Parquet + summary.

    weakloc label --input 'gs://bucket/shards/train-*.tfrecord' --model gs://bucket/models/cls.keras \
                  --output gs://bucket/weak_labels/2026-11-25 [--runner DataflowRunner ...]

Any flag that is not weakloc's is a Beam pipeline option and passes through unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.io.filesystems import FileSystems

from weakloc.models.schema import failure_row
from weakloc.transforms.decode import DecodeDoFn
from weakloc.transforms.inference import CamModelHandler
from weakloc.transforms.read import FAILURES, SKIPPED, ReadInputs
from weakloc.transforms.write import WriteOutputs

from . import options

logger = logging.getLogger(__name__)


def _failed_batch_rows(failed):
    """RunInference's dead letter -> one failure row per image of the batch.

    Beam hands (batch, (exception type, repr, traceback lines)); an exception object is accepted too.
    """
    batch, err = failed
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
        config.spec.class_names,
        max_pixels=config.max_pixels,
        label_offset=config.label_offset,
    )
    side = {"skip_ids": skip_ids} if skip_ids is not None else {}
    decoded = read["inputs"] | "Decode" >> beam.ParDo(decode_fn, **side).with_outputs(
        FAILURES, SKIPPED, main="images")
    handler = CamModelHandler(config.spec, config.box, batch_size=config.batch_size)
    annotated, dead = decoded.images | "CamInference" >> RunInference(handler).with_exception_handling()
    failures = (
        read[FAILURES],
        decoded[FAILURES],
        dead.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows),
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
    ap = argparse.ArgumentParser(
        prog="weakloc label",
        # No prefix matching: Beam's --labels would be taken for --labels_from_folder, --top for --top_k.
        allow_abbrev=False,
        description="Label images with CAM boxes. Flags not listed here are Beam pipeline options "
        "(--runner, --direct_num_workers, --project, --region, --temp_location, --setup_file, ...).",
    )
    options.add_label_args(ap)
    return ap


def run(argv: Optional[list[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    """Parse, validate, build and run; returns the summary that was written.

    Args:
      argv: command-line flags (weakloc's and Beam's).
      test_pipeline: a pipeline to build into instead of a new one (tests pass a TestPipeline).
    """
    args, beam_args = parser().parse_known_args(argv)
    options.check_beam_args(beam_args)
    pipeline_options = PipelineOptions(beam_args)
    config = options.validate(args, runner=pipeline_options.view_as(StandardOptions).runner)
    if config.overwrite:
        options.remove_previous_outputs(config.output)
    # Workers unpickle DoFns that live in the weakloc package: keep the main session out of it.
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=pipeline_options)
    build(p, config)
    result = p.run()
    result.wait_until_finish()
    summary_path = FileSystems.join(config.output.rstrip("/"), "summary.json")
    if not FileSystems.exists(summary_path):
        # A runner that returns before the job ends (e.g. Dataflow without waiting): nothing to report yet.
        logger.info("job submitted; summary will appear at %s", summary_path)
        return {}
    with FileSystems.open(summary_path) as f:
        return json.loads(f.read().decode())
