"""The `weakloc` command: `weakloc label|demo|train|calibrate|evaluate|datasets|export|report ...`.

Errors a user can fix (bad flags, a model without a GAP head, a sidecar that does not match) end the command
with exit code 2 and one line that says what was expected, before any worker starts.
"""
from __future__ import annotations

import logging
import os
import sys

USAGE = """usage: weakloc <command> [flags]

commands:
  label      label images with CAM boxes (Beam pipeline): weakloc label --input PATTERN --model M.keras --output DIR
  demo       train, calibrate and label an embedded synthetic dataset, offline, and score the boxes
  train      train a GAP classifier on image-level labels: weakloc train --input PATTERN --output M.keras
  calibrate  choose CAM thresholds on boxed images: weakloc calibrate --input PATTERN --model M.keras --output T.json
  evaluate   score labels against true boxes: weakloc evaluate --annotations DIR --ground_truth PATTERN|VOC_DIR|COCO.json
  datasets   make benchmark data: weakloc datasets cluttered-mnist --idx_dir DIR --output DIR | shapes | photos
  export     write a run's boxes as COCO, YOLO, Pascal VOC or TF Object Detection TFRecords
  report     a static HTML page (and a PNG contact sheet) to look at a run's boxes and CAMs

`weakloc <command> --help` lists a command's flags."""


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probes, CPU feature notes) drowns the messages users need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _DropKnownNoise(logging.Filter):
    """Beam's RunInference warns once per model load that it cannot read memory use when torch is absent
    (its memory probe is imported together with a torch-only module); it is not actionable for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resource module is not available" not in record.getMessage()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # Our own progress at INFO; Beam's and TensorFlow's internals only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("weakloc").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropKnownNoise())
    _quiet_tensorflow()
    from weakloc.models.thresholds import ThresholdsError
    from weakloc.models.cam import ModelStructureError
    from weakloc.models.engines import EngineError
    from weakloc.models.export import ExportError
    from weakloc.models.sidecar import SidecarError

    from weakloc.models.train import TrainError

    from . import calibrate, datasets, demo, evaluate, export, label, report, train
    from .options import OptionsError
    from .results import IncompleteRunError

    commands = {"label": label.run, "demo": demo.run, "train": train.run, "calibrate": calibrate.run,
                "evaluate": evaluate.run, "datasets": datasets.run, "export": export.run, "report": report.run}
    if command not in commands:
        print(f"weakloc: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        commands[command](rest)
    except (OptionsError, ModelStructureError, SidecarError, ThresholdsError, TrainError, ExportError,
            IncompleteRunError, EngineError) as exc:
        print(f"weakloc {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
