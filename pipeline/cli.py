"""The `weakloc` command: `weakloc label|demo|train|calibrate|evaluate|datasets|export|report ...`.

Commands return their results; this module prints them (each command's `render(result)`), and turns every error
a user can fix into one line with exit code 2, before any worker starts. A run that produced nothing exits 1 and
says why; Ctrl-C exits 130 with one line. Library noise (TensorFlow, absl, CUDA probes, Beam, apitools) stays
hidden unless `--verbose`.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings

from .interrupt import INTERRUPTED as _INTERRUPTED

USAGE = """usage: weakloc [--version] [--verbose] <command> [flags]

commands:
  label      label images with CAM boxes (Beam pipeline): weakloc label --input PATTERN --model M.keras --output DIR
  demo       train, calibrate and label an embedded synthetic dataset, offline, and score the boxes
  train      train a GAP classifier on image-level labels: weakloc train --input PATTERN --output M.keras
  calibrate  choose CAM thresholds on boxed images: weakloc calibrate --input PATTERN --model M.keras --output T.json
  evaluate   score labels against true boxes: weakloc evaluate --annotations DIR --ground_truth VOC_DIR|COCO.json|PATTERN
  datasets   make benchmark data: weakloc datasets cluttered-mnist --idx_dir DIR --output DIR | shapes | photos
  export     write a run's boxes as COCO, YOLO, Pascal VOC or TF Object Detection TFRecords
  report     a static HTML page (and a PNG contact sheet) to look at a run's boxes and CAMs

`weakloc <command> --help` lists a command's flags; --verbose shows library logs and full tracebacks."""

COMMANDS = ("label", "demo", "train", "calibrate", "evaluate", "datasets", "export", "report")

# Loggers of libraries that talk at INFO/WARNING about things a user cannot act on (GCS auth probes, Beam's
# runner chatter, TensorFlow's Python side); shown with --verbose.
_NOISY = ("apache_beam", "absl", "tensorflow", "apitools", "google", "urllib3", "h5py", "py.warnings", "keras")


def _quiet_libraries(verbose: bool, whole_process: bool) -> None:
    """`whole_process`: the command owns the process (run from a shell), so Python warnings and library loggers
    may be silenced globally; an embedding program (or a test) keeps its own settings."""
    # TensorFlow's C++ start-up chatter (CUDA probes such as "cuInit ... UNKNOWN ERROR (303)" on a machine without
    # a GPU, CPU feature notes) is logged at ERROR level before Python sees it: only level 3 hides it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if not verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # Beam's gRPC channels
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    if not verbose and whole_process:
        logging.captureWarnings(True)  # DeprecationWarning & co. from libraries become py.warnings records
        warnings.simplefilter("ignore")
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)


# Commands that import TensorFlow (evaluate, report and export reach it through Keras at run time).
_TF_COMMANDS = ("label", "demo", "train", "calibrate", "datasets", "evaluate", "report", "export")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices with standard error pointed at /dev/null.

    TensorFlow 2.17+ writes its start-up lines ("oneDNN custom operations are on", "Could not find cuda drivers",
    "failed call to cuInit: ... UNKNOWN ERROR (303)") from C++ before its log level is read, so
    TF_CPP_MIN_LOG_LEVEL cannot hide them; the probe runs the device initialisation that prints cuInit's.
    """
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.constant(0) + 0  # the first op loads the kernels' libraries, which print the same lines again
    except Exception:
        pass  # the command's own import reports it, with standard error back
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# _INTERRUPTED is set by Ctrl-C. Beam turns a KeyboardInterrupt inside a step into a RuntimeError naming the step
# (and logs it), OpenVINO's converter into a conversion error: the flag tells the interrupt apart from a failure.


# Seconds a Ctrl-C may take to unwind before the process ends itself: a KeyboardInterrupt raised inside a
# finaliser or a C++ callback can be printed and swallowed, and the command would run on.
_INTERRUPT_GRACE_SECONDS = 15.0
_RUNNING: dict = {}  # {"command", "output"} of the command this process runs from the shell
_FINISHING = threading.Lock()


def _finish_interrupt(command: str, output) -> None:
    """The one line of a Ctrl-C, after Beam's temp folders are gone, then exit 130 (once, from any thread)."""
    if not _FINISHING.acquire(blocking=False):  # another thread is saying it and will end the process
        if threading.current_thread() is threading.main_thread():
            _FINISHING.acquire()  # never returns: that thread exits
        return
    from .interrupt import clean_partial_output

    kept = clean_partial_output(command, output)
    print(f"\nweakloc {command}: interrupted; {kept}", file=sys.stderr, flush=True)
    # Beam's and TensorFlow's worker threads would print their own tracebacks while Python shuts down.
    sys.stdout.flush()
    os._exit(130)


def _on_sigint(signum, frame):
    if not _INTERRUPTED.is_set() and _RUNNING:
        timer = threading.Timer(_INTERRUPT_GRACE_SECONDS, _finish_interrupt, (_RUNNING["command"], _RUNNING["output"]))
        timer.daemon = True
        timer.start()
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _on_unraisable(hook_args) -> None:
    """A Ctrl-C that landed in a finaliser would be printed as 'Exception ignored' and lost: end the run now."""
    if _INTERRUPTED.is_set() and isinstance(hook_args.exc_value, KeyboardInterrupt) and _RUNNING:
        _finish_interrupt(_RUNNING["command"], _RUNNING["output"])
    sys.__unraisablehook__(hook_args)


class _DropKnownNoise(logging.Filter):
    """Beam's RunInference warns once per model load that it cannot read memory use when torch is absent
    (its memory probe is imported together with a torch-only module); it is not actionable for our users.
    After Ctrl-C, libraries' reports of the interrupt are dropped: the command says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _INTERRUPTED.is_set() and not record.name.startswith("weakloc"):
            return False
        return "Resource module is not available" not in record.getMessage()


class _Format(logging.Formatter):
    """weakloc's own messages as `weakloc: ...` / `weakloc: warning: ...`; other libraries' with their name."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name.startswith("weakloc"):
            level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
            text = f"weakloc: {level}{msg}"
        else:
            text = f"{record.levelname} {record.name}: {msg}"
        if record.exc_info and logging.getLogger("weakloc").level <= logging.DEBUG:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging(verbose: bool) -> None:
    """Our own progress at INFO; libraries' only when they warn. As logging.basicConfig: a process that set up
    its own handlers (an embedding program, pytest) keeps them."""
    logging.getLogger("weakloc").setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if any(not getattr(h, "_weakloc", False) for h in root.handlers):
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.addFilter(_DropKnownNoise())
    handler._weakloc = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("weakloc")
    except Exception:
        return "unknown"


def _output_of(argv: list[str]):
    for i, a in enumerate(argv):
        if a == "--output" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output="):
            return a.split("=", 1)[1]
    return None


def main(argv=None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if argv and argv[0] == "--version":
        print(f"weakloc {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from .args import did_you_mean

        print(f"weakloc: error: unknown command {command!r}{did_you_mean(command, COMMANDS)}; commands: "
              f"{', '.join(COMMANDS)} (see weakloc --help)", file=sys.stderr)
        return 2
    _quiet_libraries(verbose, from_shell)
    if from_shell and threading.current_thread() is threading.main_thread():
        _RUNNING.update(command=command, output=_output_of(rest))
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _on_unraisable
    if from_shell and not verbose and command in _TF_COMMANDS and "--help" not in rest and "-h" not in rest:
        _import_tensorflow_quietly()
    _setup_logging(verbose)
    try:
        return _run(command, rest, verbose)
    except KeyboardInterrupt:
        if from_shell:
            _finish_interrupt(command, _output_of(rest))
        from .interrupt import clean_partial_output

        kept = clean_partial_output(command, _output_of(rest))
        print(f"\nweakloc {command}: interrupted; {kept}", file=sys.stderr, flush=True)
        return 130


def _run(command: str, rest: list[str], verbose: bool) -> int:
    from weakloc.models.engines import EngineError
    from weakloc.models.export import ExportError
    from weakloc.models.files import FileFormatError
    from weakloc.models.graph import ModelStructureError
    from weakloc.models.opening import ModelFileError
    from weakloc.models.sidecar import SidecarError
    from weakloc.models.thresholds import ThresholdsError
    from weakloc.models.train import TrainError

    from . import calibrate, datasets, demo, evaluate, export, label, report, train
    from .options import OptionsError
    from .results import EmptyRunError, IncompleteRunError

    modules = {"label": label, "demo": demo, "train": train, "calibrate": calibrate, "evaluate": evaluate,
               "datasets": datasets, "export": export, "report": report}
    module = modules[command]
    try:
        result = module.run(rest)
    except (OptionsError, ModelStructureError, ModelFileError, FileFormatError, SidecarError, ThresholdsError,
            TrainError, ExportError, IncompleteRunError, EngineError) as exc:
        print(f"weakloc {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except EmptyRunError as exc:
        if exc.text:
            print(exc.text, flush=True)
        print(f"weakloc {command}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse: --help (0) or a flag mistake, already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt from None
        if verbose:
            raise
        print(f"weakloc {command}: error: {type(exc).__name__}: {_one_line(exc)} (run with --verbose for the "
              "traceback)", file=sys.stderr)
        return 1
    render = getattr(module, "render", None)
    if render is not None and result:
        print(render(result), flush=True)
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 2000 else text[:2000] + " ..."


if __name__ == "__main__":
    sys.exit(main())
