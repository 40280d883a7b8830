"""Mistakes a newcomer makes, each ending in one line and the right exit code (issue 15): bad model files, misspelt
flags and commands, missing folders, empty runs, Ctrl-C; and a plain run that shows no library noise."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from weakloc.pipeline import cli
from tests.helpers import RUNNER, shared_path, save_model, tiny_gap_model

ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"weakloc {command}: error: ") and "Traceback" not in err[0]
    return err[0]


def write_images(folder, n: int, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:04d}.png")


def test_version_and_unknown_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("weakloc ")
    assert cli.main(["calibrat"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'calibrat' (did you mean calibrate?)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, wrong, right", [
    (["calibrate", "--input", "x.tfrecord", "--model", "m.keras", "--outptu", "t.json"], "--outptu", "--output"),
    (["evaluate", "--anotations", "x"], "--anotations", "--annotations"),
    (["label", "--input", "x/*.jpg", "--model", "m.keras", "--output", "o", "--classse", "labels"], "--classse",
     "--classes"),
    (["label", "--input", "x/*.jpg", "--model", "m.keras", "--outptu", "o"], "--outptu", "--output"),
    # demo passes unknown flags on to label: checked at launch, not after the training
    (["demo", "--output", "d", "--emit_cam"], "--emit_cam", "--emit_cams"),
    (["demo", "--train_image", "10"], "--train_image", "--train_images"),
])
def test_misspelt_flag_says_did_you_mean_and_exits_2(capsys, argv, wrong, right):
    assert cli.main(argv) == 2
    line = one_line_error(capsys, argv[0])
    assert f"unrecognised flag {wrong} (did you mean {right}?)" in line
    assert "unrecognized" not in line


@pytest.mark.parametrize("argv, right", [
    (["datasets", "photo", "--root", "x", "--output", "o"], "photos"),
    (["calibrate", "--input", "x.tfrecord", "--model", "m.keras", "--output", "t.json", "--boxes", "larges"],
     "largest"),
])
def test_misspelt_sub_command_or_choice_says_did_you_mean(capsys, argv, right):
    assert cli.main(argv) == 2
    line = one_line_error(capsys, argv[0])
    assert "invalid choice" in line and f"(did you mean {right}?)" in line


def test_a_run_where_every_input_failed_exits_1_with_the_reason_last(capsys, tmp_path, fruit_like_model):
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"x{i}.jpg").write_bytes(b"not a picture %d" % i)
    argv = ["label", "--input", str(tmp_path / "in" / "*.jpg"), "--model", fruit_like_model, f"--runner={RUNNER}"]
    assert cli.main(argv + ["--output", str(tmp_path / "out")]) == 1
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines()[-1].startswith("weakloc label: every input failed (3 of 3: decode 3)")
    assert "failures:        3" in cap.out and "Traceback" not in cap.err
    assert cli.main(argv + ["--output", str(tmp_path / "out2"), "--allow_empty"]) == 0


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_path):
    d = tmp_path_factory.mktemp("bad_models")
    good = open(tiny_model_path, "rb").read()
    (d / "truncated.keras").write_bytes(good[: len(good) // 2])
    (d / "text.keras").write_bytes(b"this is a README, not a model\n")
    (d / "empty.keras").write_bytes(b"")
    return d, tiny_model_path.replace(".keras", ".json")


@pytest.mark.parametrize("command", ["label", "calibrate"])
@pytest.mark.parametrize("name, expected", [
    ("truncated.keras", "damaged or truncated .keras archive"),
    ("text.keras", "is not a Keras model file"),
    ("empty.keras", "is empty"),
    ("SIDECAR", "is a JSON file (a sidecar or thresholds file?), not a model"),
])
def test_unreadable_model_files_exit_2_with_one_line(capsys, tmp_path, bad_models, command, name, expected):
    d, sidecar = bad_models
    model = sidecar if name == "SIDECAR" else str(d / name)
    write_images(tmp_path / "in", 2)
    argv = [command, "--input", str(tmp_path / "in" / "*.png"), "--model", model, "--output",
            str(tmp_path / ("out" if command == "label" else "t.json"))]
    if command == "label":
        argv.append(f"--runner={RUNNER}")
    assert cli.main(argv) == 2
    line = one_line_error(capsys, command)
    assert expected in line and "File not found" not in line


def test_missing_folders_exit_2(capsys, tmp_path):
    for command, extra in (("report", ["--output", str(tmp_path / "r")]),
                           ("export", ["--format", "coco", "--output", str(tmp_path / "e")]),
                           ("evaluate", [])):
        assert cli.main([command, "--annotations", str(tmp_path / "nowhere"), *extra]) == 2
        assert "--annotations " + str(tmp_path / "nowhere") + " does not exist" in one_line_error(capsys, command)
    assert not (tmp_path / "r").exists()
    assert cli.main(["datasets", "photos", "--root", str(tmp_path), "--output", str(tmp_path / "d")]) == 2
    assert "is not the photos folder" in one_line_error(capsys, "datasets")


def _all_parsers():
    from weakloc.pipeline import calibrate, datasets, demo, evaluate, export, label, report, train

    for module in (calibrate, datasets, demo, evaluate, export, label, report, train):
        top = module.parser()
        yield module.__name__, top
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{module.__name__} {k}", p) for k, p in action.choices.items())


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in _all_parsers():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and not (action.default is None or action.default is False
                                              or action.default == [] or action.default == argparse.SUPPRESS):
                assert "default" in (parser._get_formatter()._get_help_string(action) or ""), \
                    f"{name} {action.option_strings} hides its default {action.default!r}"
        assert "usage: " in text


@pytest.fixture(scope="module")
def fruit_like_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fruit_model")
    return save_model(tiny_gap_model(), d, "fruit", {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0,
                                                     "class_names": ["apple", "banana", "orange"]})


def _subprocess(argv, **kw):
    return subprocess.run([sys.executable, "-m", "weakloc.pipeline.cli", *argv], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


@pytest.mark.slow
def test_folder_labels_naming_no_class_warn_and_an_empty_run_exits_1_quietly(tmp_path, fruit_like_model):
    """kangaroo/images/*.jpg with --classes labels: `images` is no class, so no image gets a box. A fresh process
    as a user runs it: the warning at launch, exit 1 with the reason last, and no TensorFlow/absl/CUDA noise."""
    write_images(tmp_path / "kangaroo" / "images", 6)
    argv = ["label", "--input", str(tmp_path / "kangaroo" / "*" / "*.png"), "--model", fruit_like_model, "--classes", "labels",
            f"--runner={RUNNER}"]
    done = _subprocess(argv + ["--output", str(tmp_path / "out")])
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip().splitlines()
    assert any("parent folders (images) but none of them is a model class" in line for line in err)
    assert err[-1].startswith("weakloc label: no image got a box (6 images annotated, 0 boxes)")
    for noise in ("cuInit", "oneDNN", "absl", "cuda", "I0000", "E0000", "Traceback", "apitools", "DeprecationWarning"):
        assert noise not in done.stderr, noise
    assert "annotated rows:  6" in done.stdout and "boxes:           0" in done.stdout  # the summary, on stdout
    allowed = _subprocess(argv + ["--output", str(tmp_path / "out2"), "--allow_empty"])
    assert allowed.returncode == 0, allowed.stderr


def _interrupted(proc: subprocess.Popen, ready, *, settle: float = 1.0, timeout: float = 60) -> tuple[str, str]:
    """SIGINT `proc` once `ready(proc)` has returned (the text it read on the way, if any, is put before stderr)
    and `settle` seconds have passed; returns its (stdout, stderr). A process still running at the end is killed."""
    try:
        early = ready(proc) or ""
        assert proc.poll() is None, f"the run ended before it could be interrupted: {early}"
        time.sleep(settle)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, early + err


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_no_beam_temp(tmp_path, fruit_like_model):
    write_images(tmp_path / "in", 1500, seed=1)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "weakloc.pipeline.cli", "label", "--input",
                             str(tmp_path / "in" / "*.png"), "--model", fruit_like_model, "--output", str(out),
                             "--batch_size", "1", "--decode_threads", "0", f"--runner={RUNNER}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    def beam_temp_made(proc):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("beam-temp-*")):
            time.sleep(0.2)

    _, err = _interrupted(proc, beam_temp_made)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("weakloc label: interrupted; no output written"), err
    assert not list(out.glob("beam-temp-*")) and not (out / "summary.json").exists()


def test_real_truncated_model_from_shared_photo_is_not_a_model(capsys, tmp_path):
    """A real damaged file a user may pass by mistake: the truncated kangaroo JPEG as --model."""
    jpeg = next(p for p in sorted(shared_path("photos", "kangaroo", "images").glob("*.jpg")))
    write_images(tmp_path / "in", 1)
    assert cli.main(["calibrate", "--input", str(tmp_path / "in" / "*.png"), "--model", str(jpeg), "--output",
                     str(tmp_path / "t.json")]) == 2
    assert "is not a Keras model file" in one_line_error(capsys, "calibrate")


@pytest.mark.slow
@pytest.mark.parametrize("command, marker", [("calibrate", "GAP head"), ("train", "training on:")])
def test_ctrl_c_in_calibrate_or_train_exits_130_and_says_nothing_was_written(tmp_path, fruit_like_model, command,
                                                                           marker):
    """SIGINT once the command is under way (its launch line is out): one line, exit 130, no traceback, and no
    half-written model or thresholds file."""
    from tests.test_ground_truth import voc_xml

    pics = tmp_path / "in"
    write_images(pics, 600, seed=2)
    for i in range(600):  # boxes for calibrate; their names give train its labels
        (pics / f"img_{i:04d}.xml").write_text(voc_xml(f"img_{i:04d}.png", [(["apple", "banana"][i % 2], 2, 2, 20, 20)]))
    out = tmp_path / ("t.json" if command == "calibrate" else "m.keras")
    argv = {"calibrate": ["--model", fruit_like_model],
            "train": ["--ground_truth", str(pics), "--input_size", "32,32", "--epochs", "50", "--batch_size", "2"]}
    proc = subprocess.Popen([sys.executable, "-m", "weakloc.pipeline.cli", command, "--input", str(pics / "*.png"),
                             *argv[command], "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)

    def launch_line_out(proc):
        err = []
        for line in proc.stderr:
            err.append(line)
            if marker in line:
                break
        return "".join(err)

    _, err = _interrupted(proc, launch_line_out)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"weakloc {command}: interrupted; no output written"], err
    assert not out.exists()
    for noise in ("cuInit", "oneDNN", "absl", "I0000", "E0000", "W0000", "apitools", "Warning:"):
        assert noise not in err, noise  # a plain CPU run up to the interrupt: weakloc's own lines only


def test_train_on_a_labelless_folder_with_voc_beside_names_the_flag(capsys, tmp_path):
    """kangaroo/images/*.jpg with kangaroo/annots/*.xml: no folder label (images is a layout folder), but boxes to
    hand. One line, exit 2, naming the --ground_truth that would give every picture its labels."""
    from tests.test_ground_truth import voc_xml

    write_images(tmp_path / "kangaroo" / "images", 3)
    (tmp_path / "kangaroo" / "annots").mkdir()
    for i in range(3):
        (tmp_path / "kangaroo" / "annots" / f"img_{i:04d}.xml").write_text(
            voc_xml(f"img_{i:04d}.png", [("kangaroo", 2, 2, 20, 20)]))
    argv = ["train", "--input", str(tmp_path / "kangaroo" / "images" / "*.png"), "--output", str(tmp_path / "m.keras")]
    assert cli.main(argv) == 2
    line = one_line_error(capsys, "train")
    assert "no image-level labels in 3 input files" in line
    assert line.endswith(f"pass --ground_truth {tmp_path / 'kangaroo' / 'annots'} to take each picture's labels "
                         "from its objects")
    assert not (tmp_path / "m.keras").exists()


def test_evaluate_a_run_of_plain_pictures_without_truth_names_the_flag(capsys, tmp_path, fruit_like_model):
    """Picture files carry no boxes: evaluate has nothing to score and says where the truth would come from."""
    write_images(tmp_path / "in", 3)
    assert cli.main(["label", "--input", str(tmp_path / "in" / "*.png"), "--model", fruit_like_model, "--output",
                     str(tmp_path / "out"), f"--runner={RUNNER}"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--annotations", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys, "evaluate")
    assert "no annotation row carries ground-truth boxes" in line
    assert line.endswith("pass their truth with --ground_truth VOC_DIR | COCO.json | 'shards/*.tfrecord'")
    assert not (tmp_path / "out" / "evaluation.json").exists()


_SWALLOWER = """
import signal, sys, time
from weakloc.pipeline import cli
cli._INTERRUPT_GRACE_SECONDS = 1.0
cli._RUNNING.update(command="train", output={output!r})
signal.signal(signal.SIGINT, cli._on_sigint)
sys.unraisablehook = cli._on_unraisable
print("ready", flush=True)
{body}
print("the run went on", flush=True)
"""
_SWALLOWS = {
    # a library that catches the interrupt and carries on: the grace period ends the process
    "caught": "for _ in range(300):\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass",
    # Ctrl-C inside a finaliser: Python prints 'Exception ignored' and goes on; the hook ends the run instead
    "finaliser": "class Slow:\n    def __del__(self):\n        time.sleep(30)\nx = Slow()\ndel x\ntime.sleep(30)",
}


@pytest.mark.parametrize("how", sorted(_SWALLOWS))
def test_a_swallowed_ctrl_c_still_ends_the_run_with_one_line_and_130(tmp_path, how):
    code = _SWALLOWER.format(output=str(tmp_path / "m.keras"), body=_SWALLOWS[how])
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)

    def says_ready(proc):
        assert proc.stdout.readline().strip() == "ready"

    out, err = _interrupted(proc, says_ready, settle=0.5, timeout=20)
    assert proc.returncode == 130, err
    assert "the run went on" not in out
    assert err.strip().splitlines() == ["weakloc train: interrupted; no output written"], err
