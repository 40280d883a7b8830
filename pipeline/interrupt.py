"""What Ctrl-C leaves behind: Beam's half-written temp folders are removed, finished files are named."""
from __future__ import annotations

import logging
from typing import Optional

from apache_beam.io.filesystems import FileSystems

logger = logging.getLogger(__name__)

# Beam's file sinks stage shards in beam-temp-* folders inside the output and rename them when the job ends.
TEMP_GLOB = "beam-temp-*"


def clean_partial_output(command: str, output: Optional[str]) -> str:
    """Delete Beam temp folders under `output` and say what stays: the tail of the one-line interrupt message."""
    if not output:
        return "no output written"
    try:
        temps = [m.path for m in FileSystems.match([FileSystems.join(output.rstrip("/"), TEMP_GLOB)])[0].metadata_list]
    except Exception:
        temps = []
    removed = 0
    for path in temps:
        try:
            FileSystems.delete([path])
            removed += 1
        except Exception as exc:  # never let clean-up hide the interrupt itself
            logger.debug("could not delete %s: %s", path, exc)
    summary = FileSystems.join(output.rstrip("/"), "summary.json")
    finished = command == "label" and _exists(summary)
    note = f" (removed {removed} unfinished temp folders)" if removed else ""
    if finished:
        return f"the run had finished writing {output}{note}"
    if command == "label":
        return f"no output written{note}: {output} holds no finished run"
    return f"{output} may be incomplete{note}"


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception:
        return False
