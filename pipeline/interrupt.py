"""What Ctrl-C leaves behind: Beam's half-written temp folders are removed, finished files are named."""
from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# Set by the CLI's SIGINT handler. Libraries that run Python callbacks from C++ (OpenVINO's converter) turn the
# KeyboardInterrupt into an error of their own; code that would recover from such an error asks this first.
INTERRUPTED = threading.Event()

# Beam's file sinks stage shards in beam-temp-* folders inside the output and rename them when the job ends.
TEMP_GLOB = "beam-temp-*"


def clean_partial_output(command: str, output: Optional[str]) -> str:
    """Delete Beam temp folders under `output` and say what stays: the tail of the one-line interrupt message."""
    from apache_beam.io.filesystems import FileSystems

    if not output:
        return "no output written"
    removed = _remove_temp_folders(output.rstrip("/"))
    summary = FileSystems.join(output.rstrip("/"), "summary.json")
    finished = command == "label" and _exists(summary)
    note = f" (removed {removed} unfinished temp folders)" if removed else ""
    if finished:
        return f"the run had finished writing {output}{note}"
    if command == "label":
        return f"no output written{note}: {output} holds no finished run"
    if not removed and not _exists(output.rstrip("/")):  # train, calibrate: they write at the very end
        return "no output written"
    return f"{output} may be incomplete{note}"


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(path)
    except Exception:
        return False


def _remove_temp_folders(output: str) -> int:
    """Delete output/beam-temp-*; returns how many went. Never raises: clean-up must not hide the interrupt."""
    if "://" not in output:
        folders = glob.glob(os.path.join(glob.escape(output), TEMP_GLOB))
        for path in folders:
            shutil.rmtree(path, ignore_errors=True)
        return sum(not os.path.exists(p) for p in folders)
    from apache_beam.io.filesystems import FileSystems

    try:  # object stores have no folders: delete the objects under each temp prefix
        found = FileSystems.match([FileSystems.join(output, TEMP_GLOB, "*")])[0].metadata_list
        paths = [m.path for m in found]
        if paths:
            FileSystems.delete(paths)
        return len({p.rsplit("/", 2)[-2] for p in paths})
    except Exception as exc:
        logger.debug("could not delete the temp files under %s: %s", output, exc)
        return 0
