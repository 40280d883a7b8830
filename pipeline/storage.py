"""Filesystem flags for commands that read and write through Beam's filesystems without running a pipeline.

`weakloc export` and `weakloc evaluate` take Beam's own storage options (`--s3_endpoint_url`,
`--s3_access_key_id`, `--s3_region_name`, ... for s3://; GCP's for gs://), exactly as `weakloc label` passes them
to its pipeline, so one set of flags reaches the same bucket from every command.
"""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from .options import check_beam_args


def use_filesystem_flags(beam_args: list[str]) -> PipelineOptions:
    """Refuse flags that are not Beam options, then make FileSystems use the rest; returns the options."""
    check_beam_args(beam_args)
    opts = PipelineOptions(beam_args)
    FileSystems.set_options(opts)
    return opts
