"""`weakloc label`'s option errors and thresholds files: refused before anything runs or is written, and what a
thresholds file's stretch, refinement and contrast flag do to the boxes.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from weakloc.models import records, synthetic
from weakloc.models.cam import ModelStructureError
from weakloc.models.sidecar import SidecarError
from weakloc.models.thresholds import ThresholdsError
from weakloc.pipeline import results
from weakloc.pipeline.options import OptionsError

from tests.helpers import (CLASSES, expect_refusal, label_argv, png_bytes, run, save_model)


# --------------------------------------------------------------------------------------------------------------
# Option errors: raised by label.run before anything runs or is written.
# --------------------------------------------------------------------------------------------------------------


def test_refuses_input_matching_nothing(tiny_model_path, tmp_path):
    out = tmp_path / "o"
    expect_refusal(OptionsError, label_argv(str(tmp_path / "nothing-*.tfrecord"), tiny_model_path, out), out,
                    match="matches no file")


def test_refuses_existing_output_then_overwrite_replaces_it(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    first = run(*label_argv(small_shard, tiny_model_path, out, "--num_shards", "3"))
    assert len(first["files"]["annotations"]) == 3
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OptionsError, match="--overwrite"):
        run(*label_argv(small_shard, tiny_model_path, out, "--num_shards", "1"))
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    second = run(*label_argv(small_shard, tiny_model_path, out, "--num_shards", "1", "--overwrite"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["annotations-00000-of-00001.parquet", "failures-00000-of-00001.parquet", "metrics.json",
                     "summary.json"]
    assert [os.path.basename(f) for f in second["files"]["annotations"]] == ["annotations-00000-of-00001.parquet"]
    table = results.read_table(str(out))
    assert sorted(table.column("image_id").to_pylist()) == ["s0", "s1", "s2"]  # no rows of the first run


def test_overwrite_keeps_foreign_files(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    run(*label_argv(small_shard, tiny_model_path, out))
    (out / "README.txt").write_text("not weakloc's")
    run(*label_argv(small_shard, tiny_model_path, out, "--overwrite"))
    assert (out / "README.txt").read_text() == "not weakloc's"


@pytest.mark.parametrize("flags", [
    ["--cam_threshold", "1.5"],
    ["--cam_threshold", "-0.1"],
    ["--min_score", "2"],
    ["--min_box_area", "-1"],
])
def test_refuses_values_outside_unit_interval(small_shard, tiny_model_path, tmp_path, flags):
    out = tmp_path / "o"
    expect_refusal(OptionsError, label_argv(small_shard, tiny_model_path, out, *flags), out, match=r"\[0, 1\]")


@pytest.mark.parametrize("doc, match", [
    ({"default": 1.5}, "default"),
    ({"per_class": {"dog": -0.2}}, "dog"),
    ({"default": 0.3, "per_class": {"zebra": 0.4}}, "zebra"),
    ([0.3, 0.4], "object"),
])
def test_refuses_bad_thresholds_file(small_shard, tiny_model_path, tmp_path, doc, match):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps(doc))
    out = tmp_path / "o"
    expect_refusal(ThresholdsError, label_argv(small_shard, tiny_model_path, out, "--thresholds", str(thr)), out,
                    match=match)


def test_thresholds_file_is_applied(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.35, "per_class": {"bird": 0.7}}))
    summary = run(*label_argv(small_shard, tiny_model_path, tmp_path / "o", "--thresholds", str(thr)))
    assert summary["options"]["cam_threshold"] == 0.35
    assert summary["options"]["per_class_thresholds"] == {"bird": 0.7}


def test_refuses_sidecar_with_wrong_class_count(small_shard, tiny_model_path, tmp_path):
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0,
                                "class_names": ["cat", "dog"]}))
    out = tmp_path / "o"
    expect_refusal(SidecarError, label_argv(small_shard, tiny_model_path, out, "--sidecar", str(side)), out,
                    match="2 names.*3 classes")
    expect_refusal(SidecarError, label_argv(small_shard, tiny_model_path, out, "--class_names", "a,b,c,d"), out,
                    match="4 names")


def test_refuses_sidecar_with_wrong_input_size(small_shard, tiny_model_path, tmp_path):
    out = tmp_path / "o"
    expect_refusal(SidecarError, label_argv(small_shard, tiny_model_path, out, "--input_size", "64,64"), out,
                    match="does not match")


def test_refuses_model_without_gap_head(small_shard, tmp_path):
    import keras
    from keras import layers

    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = layers.Flatten()(x)
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(x))
    path = save_model(model, tmp_path, "flat", {"input_size": [32, 32], "class_names": list(CLASSES)})
    out = tmp_path / "o"
    expect_refusal(ModelStructureError, label_argv(small_shard, path, out), out, match="GlobalAveragePooling2D")


@pytest.mark.parametrize("flags, match", [
    (["--cam_treshold", "0.3"], "cam_treshold"),  # a typo
    (["--no_such_flag=1"], "no_such_flag"),
    # an abbreviation is not a flag: it must not silently become --top_k
    (["--top", "2"], "--top"),
])
def test_refuses_unknown_flags(small_shard, tiny_model_path, tmp_path, flags, match):
    out = tmp_path / "o"
    expect_refusal(OptionsError, label_argv(small_shard, tiny_model_path, out, *flags), out, match=match)


def test_refuses_stray_positional_arguments(small_shard, tiny_model_path, tmp_path):
    # An unquoted glob expanded by the shell: `--input a.tfrecord b.tfrecord` must not silently drop b.
    out = tmp_path / "o"
    expect_refusal(OptionsError, label_argv(small_shard, tiny_model_path, out) + [small_shard + ".other"], out,
                    match="other")


def test_beam_flag_that_prefixes_a_weakloc_flag_passes_through(small_shard, tiny_model_path, tmp_path):
    # Dataflow's --labels (job labels) starts like --labels_from_folder; it is Beam's, not an abbreviation.
    summary = run(*label_argv(small_shard, tiny_model_path, tmp_path / "o", "--labels", "team=vision"))
    assert summary["counts"]["annotated"] == 3


@pytest.mark.parametrize("flags, match", [
    (["--top_k", "4"], "larger than the model's 3 classes"),
    (["--top_k", "0"], ">= 1"),
    (["--batch_size", "0"], ">= 1"),
])
def test_refuses_bad_counts(small_shard, tiny_model_path, tmp_path, flags, match):
    out = tmp_path / "o"
    expect_refusal(OptionsError, label_argv(small_shard, tiny_model_path, out, *flags), out, match=match)


def test_box_stretch_from_thresholds_file_scales_boxes_about_their_centres(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5}))
    plain = run(*label_argv(small_shard, tiny_model_path, tmp_path / "a", "--thresholds", str(thr)))
    thr.write_text(json.dumps({"default": 0.5, "box_stretch": [0.5, 0.5]}))
    half = run(*label_argv(small_shard, tiny_model_path, tmp_path / "b", "--thresholds", str(thr)))
    assert plain["options"]["box_stretch"] == [1.0, 1.0] and half["options"]["box_stretch"] == [0.5, 0.5]
    key = lambda r: r["image_id"]
    rows_a = sorted(results.read_table(str(tmp_path / "a")).to_pylist(), key=key)
    rows_b = sorted(results.read_table(str(tmp_path / "b")).to_pylist(), key=key)
    assert rows_a and all(r["boxes"] for r in rows_a)
    for ra, rb in zip(rows_a, rows_b):
        a, b = ra["boxes"][0], rb["boxes"][0]
        # Half the width and height, same centre (input 32 px -> original 40 px: still a linear map).
        assert b["xmax"] - b["xmin"] == pytest.approx((a["xmax"] - a["xmin"]) / 2, abs=1e-4)
        assert b["ymax"] - b["ymin"] == pytest.approx((a["ymax"] - a["ymin"]) / 2, abs=1e-4)
        assert b["xmin"] + b["xmax"] == pytest.approx(a["xmin"] + a["xmax"], abs=1e-4)
    with pytest.raises(OptionsError, match="box_stretch"):
        run(*label_argv(small_shard, tiny_model_path, tmp_path / "c", "--thresholds", str(thr), "--box_stretch", "2"))


def _halving_refiner(taus=(0.3, 0.6)) -> dict:
    """A refinement whose only non-zero coefficient is the intercept: log(w'/w) = log(h'/h) = log 0.5."""
    f = 2 + 4 * len(taus)
    coef = np.zeros((f + 1, 4))
    coef[-1, 2:] = np.log(0.5)
    return {"taus": list(taus), "alpha": 1.0, "mean": [0.0] * f, "scale": [1.0] * f, "coef": coef.tolist()}


def test_box_refine_and_cam_contrast_from_thresholds_file(small_shard, tiny_model_path, tmp_path):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5}))
    plain = run(*label_argv(small_shard, tiny_model_path, tmp_path / "a", "--thresholds", str(thr)))
    thr.write_text(json.dumps({"default": 0.5, "box_refine": _halving_refiner()}))
    half = run(*label_argv(small_shard, tiny_model_path, tmp_path / "b", "--thresholds", str(thr)))
    assert not plain["options"]["box_refine"] and half["options"]["box_refine"]
    key = lambda r: r["image_id"]
    rows_a = sorted(results.read_table(str(tmp_path / "a")).to_pylist(), key=key)
    rows_b = sorted(results.read_table(str(tmp_path / "b")).to_pylist(), key=key)
    assert rows_a and all(r["boxes"] for r in rows_a)
    for ra, rb in zip(rows_a, rows_b):
        a, b = ra["boxes"][0], rb["boxes"][0]
        assert b["xmax"] - b["xmin"] == pytest.approx((a["xmax"] - a["xmin"]) / 2, abs=1e-3)
        assert b["ymax"] - b["ymin"] == pytest.approx((a["ymax"] - a["ymin"]) / 2, abs=1e-3)
        assert b["ymin"] + b["ymax"] == pytest.approx(a["ymin"] + a["ymax"], abs=1e-3)
    # --no_box_refine gives the plain boxes back; the file's cam_contrast switches contrast CAMs on.
    thr.write_text(json.dumps({"default": 0.5, "box_refine": _halving_refiner(), "cam_contrast": True}))
    off = run(*label_argv(small_shard, tiny_model_path, tmp_path / "c", "--thresholds", str(thr), "--no_box_refine"))
    assert not off["options"]["box_refine"] and off["options"]["cam_contrast"]
    assert not plain["options"]["cam_contrast"]


@pytest.mark.parametrize("doc, flags, match", [
    # A malformed document is the thresholds file's own error (ThresholdsError); the rest are OptionsErrors.
    ({"box_refine": {"taus": [0.5]}}, [], "malformed"),
    ({"box_refine": _halving_refiner()}, ["--box_stretch", "2,2"], "combined with --box_stretch"),
    ({"box_refine": _halving_refiner(), "box_stretch": [1.2, 1.0]}, [], "combined with the file's box_stretch"),
    ({"box_refine": _halving_refiner()}, ["--boxes", "all"], "combined with --boxes all"),
    ({"box_refine": _halving_refiner()}, ["--cam_threshold", "0.3"], "combined with --cam_threshold"),
    ({"box_refine": _halving_refiner()}, ["--method", "gradcam"], "combined with --method gradcam"),
    ({"cam_contrast": True}, ["--method", "gradcam"], "calibrated on contrast CAMs"),
    ({"cam_contrast": "yes"}, [], "true or false"),
    ({}, ["--cam_contrast", "--method", "gradcam"], "gradcam"),
])
def test_refuses_refinement_that_cannot_apply(small_shard, tiny_model_path, tmp_path, doc, flags, match):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5, **doc}))
    out = tmp_path / "o"
    kind = ThresholdsError if match in ("malformed", "true or false") else OptionsError
    expect_refusal(kind, label_argv(small_shard, tiny_model_path, out, "--thresholds", str(thr), *flags), out,
                    match=match)


def test_contrast_cams_are_the_class_cam_minus_the_mean_class_cam(small_shard, tiny_model_path, tmp_path):
    """Through the whole pipeline: with all 3 classes' CAMs emitted, contrast CAM_c = CAM_c - mean_c' CAM_c'."""
    flags = ("--emit_cams", "--top_k", "3", "--cam_threshold", "0.5")
    run(*label_argv(small_shard, tiny_model_path, tmp_path / "plain", *flags))
    run(*label_argv(small_shard, tiny_model_path, tmp_path / "contrast", *flags, "--cam_contrast"))

    def cams(out):
        rows = results.read_table(str(tmp_path / out)).to_pylist()
        return {r["image_id"]: {c["class_id"]: np.array(c["values"]) for c in r["cams"]} for r in rows}

    plain, contrast = cams("plain"), cams("contrast")
    assert sorted(plain) == sorted(contrast) == ["s0", "s1", "s2"]
    for image_id, maps in plain.items():
        mean = np.mean([maps[c] for c in range(3)], axis=0)
        for c in range(3):
            np.testing.assert_allclose(contrast[image_id][c], maps[c] - mean, rtol=1e-4, atol=1e-5)


def test_label_refines_exactly_as_calibrate_fitted(tiny_model_path, tmp_path):
    """A refinement fitted on calibrate's own maps (per-class thresholds, contrast CAMs) and written to the file
    gives label's boxes: the same maps, thresholds and order (refine at model resolution, then scale)."""
    from weakloc.models import boxes as boxlib
    from weakloc.models import opening, refine
    from weakloc.pipeline import calibrate, inputs

    data = synthetic.make_shapes(24, size=40, seed=3)
    shard = tmp_path / "boxed.tfrecord"
    shard.write_bytes(b"".join(records.frame_record(records.make_example(
        png_bytes(data.images[i]), source_id=f"b{i}", labels=[int(data.labels[i]) % 3],
        boxes=[list(np.asarray(data.boxes[i]) / 40)], box_labels=[int(data.labels[i]) % 3])) for i in range(24)))
    opened = opening.open_model(tiny_model_path, contrast=True)
    model, prep = opened.build(), opened.spec.prep
    source = inputs.scan([str(shard)], class_names=prep.class_names)
    examples = list(inputs.iterate(source, input_size=prep.input_size))
    normed, valid, truths, classes, _, _ = calibrate.class_maps(model, iter(examples))
    per_class = {"cat": 0.3, "dog": 0.7}
    taus = np.array([per_class.get(prep.class_names[c], 0.5) for c in classes], np.float32)
    refiner, _ = refine.fit(normed, taus, truths, valid=valid)
    expected, has = refiner.apply(normed, taus, valid)
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5, "per_class": per_class, "box_refine": refiner.to_json(),
                               "cam_contrast": True}))
    out = tmp_path / "o"
    run("--input", str(shard), "--model", tiny_model_path, "--output", str(out), "--thresholds", str(thr),
        "--classes", "labels")
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    assert has.sum() >= 20
    for i in np.flatnonzero(has):
        ex = examples[i]
        (box,) = [b for b in rows[ex.image_id]["boxes"] if b["class_id"] == classes[i]]
        want = boxlib.scale_boxes(expected[i], prep.input_size, (ex.height, ex.width))[0]
        np.testing.assert_allclose([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], want, atol=1e-4)


@pytest.mark.parametrize("extra, match", [
    (["--refine_boxes", "--fit_box_stretch"], "--refine_boxes"),
    (["--refine_boxes", "--boxes", "union"], "--refine_boxes"),
    (["--cam_contrast", "ONE_CLASS"], "at least two classes"),
])
def test_calibrate_refuses_what_cannot_be_calibrated(small_shard, tiny_model_path, tmp_path, capsys, extra, match):
    from tests.helpers import save_model, tiny_gap_model
    from weakloc.pipeline import cli

    model = tiny_model_path
    if "ONE_CLASS" in extra:
        extra = [e for e in extra if e != "ONE_CLASS"]
        model = save_model(tiny_gap_model(num_classes=1, activation="sigmoid"), tmp_path, "one",
                           {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "class_names": ["thing"]})
    code = cli.main(["calibrate", "--input", small_shard, "--model", model, "--output", str(tmp_path / "t.json"),
                     *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "t.json").exists()
