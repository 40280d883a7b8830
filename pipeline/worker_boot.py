"""`weakloc-worker-boot`: start one Beam SDK worker the way Beam's SDK container does, for process worker pools.

    python -m apache_beam.runners.worker.worker_pool_main --service_port 50000 \
        --container_executable "$(command -v weakloc-worker-boot)"

Beam's EXTERNAL worker pool without `--container_executable` starts a bare `SdkHarness` that never receives the
job's pipeline options, so Beam's filesystems on that worker have no `--s3_endpoint_url`, credentials or region
and every s3:// read fails ("Must provide one of client or options"). Beam's SDK container avoids that with its
boot program: it asks the runner's provision service for the job's options and starts `sdk_worker_main` with
them. This is that step, for a worker machine that has weakloc installed (nothing is fetched or installed here:
staged artifacts are not read).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _environment(args: argparse.Namespace, info) -> dict[str, str]:
    from google.protobuf import json_format

    workdir = os.path.join(args.semi_persistent_directory or os.environ.get("TMPDIR", "/tmp"), f"sdk-{args.id}")
    os.makedirs(workdir, exist_ok=True)
    return dict(
        os.environ,
        WORKER_ID=args.id,
        PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
        CONTROL_API_SERVICE_DESCRIPTOR=f"url: '{args.control_endpoint}'",
        LOGGING_API_SERVICE_DESCRIPTOR=f"url: '{args.logging_endpoint}'",
        SEMI_PERSISTENT_DIRECTORY=workdir,
    )


def main(argv: Optional[list[str]] = None) -> None:
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    ap = argparse.ArgumentParser(prog="weakloc-worker-boot", description=__doc__.splitlines()[0])
    # The flags Beam's worker pool passes to a container executable (worker_pool_main.py).
    ap.add_argument("--id", required=True)
    ap.add_argument("--provision_endpoint", required=True)
    ap.add_argument("--control_endpoint", required=True)
    ap.add_argument("--logging_endpoint", required=True)
    ap.add_argument("--artifact_endpoint")
    ap.add_argument("--semi_persistent_directory")
    args, _ = ap.parse_known_args(argv)
    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel).GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", args.id)], timeout=120).info
    os.execve(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"],
              _environment(args, info))


if __name__ == "__main__":
    main()
