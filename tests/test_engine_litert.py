"""The LiteRT engine (models/engines/litert.py): the fused CAM graph converted with tf.lite gives TensorFlow's
scores, CAMs and boxes at any batch size; `label --engine litert` records it; its workers never import TensorFlow;
bf16, a missing runtime and an unconvertible graph are each one clear line at launch."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from weakloc.models import annotate, cam, engines, files
from weakloc.models.engines import cache
from weakloc.pipeline import cli, label
from weakloc.transforms import inference
from tests.helpers import RUNNER, tiny_gap_model
from tests.test_engines import _boxes, _label, boxes_of, converted
from tests.worker import run_pickled_worker

LT = engines.get("litert")
needs_litert = pytest.mark.skipif(not LT.available(), reason="needs ai-edge-litert (pip install ai-edge-litert)")
@needs_litert
@pytest.mark.parametrize("activation,flip_tta,contrast", [("softmax", False, False), ("linear", True, True)])
def test_litert_gives_tensorflows_scores_cams_and_boxes_at_any_batch_size(tmp_path, activation, flip_tta, contrast):
    model = tiny_gap_model(activation=activation, seed=3)
    tf_cam = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2, flip_tta=flip_tta,
                          contrast=contrast)
    lt_cam = converted(tf_cam, tmp_path, engine=LT)
    images = np.random.default_rng(7).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    extra = np.array([[1, -1], [0, 2], [-1, -1], [2, 1], [0, -1]], np.int32)
    want, got = tf_cam(images, extra), lt_cam(images, extra)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    np.testing.assert_allclose(got.top_scores, want.top_scores, atol=1e-6)
    np.testing.assert_array_equal(got.top_classes, want.top_classes)
    np.testing.assert_array_equal(got.cam_classes, want.cam_classes)
    np.testing.assert_allclose(got.low_res, want.low_res, atol=1e-5 * np.abs(want.low_res).max())
    for mine, theirs in zip(boxes_of(got, extra), boxes_of(want, extra)):
        assert [b[0] for b in mine] == [b[0] for b in theirs]
        np.testing.assert_allclose([b[1:] for b in mine], [b[1:] for b in theirs], atol=1e-3)
    for i in range(len(images)):  # batch 1 gives what batch 5 gave (the tensors are resized between them)
        one = lt_cam(images[i : i + 1], extra[i : i + 1])
        np.testing.assert_allclose(one.low_res[0], got.low_res[i], atol=1e-6 * np.abs(got.low_res).max())
        np.testing.assert_allclose(one.scores[0], got.scores[i], atol=1e-7)
    # No requested classes (M = 0) after M = 2: only the top-k maps, as TensorFlow gives them.
    none = np.zeros((2, 0), np.int32)
    np.testing.assert_array_equal(lt_cam(images[:2], none).cam_classes, tf_cam(images[:2], none).cam_classes)
    with pytest.raises(ValueError, match="expected uint8 images of shape"):
        lt_cam(images[:, :16])


def test_litert_is_f32_only():
    assert LT.resolve_precision("auto") == "f32" and LT.resolve_precision("f32") == "f32"
    with pytest.raises(engines.EngineError, match="--engine litert runs f32 only.*--precision f32"):
        LT.resolve_precision("bf16")
    with pytest.raises(engines.EngineError, match="precision must be one of"):
        LT.resolve_precision("fp16")


@needs_litert
def test_litert_conversions_are_cached_apart_from_openvinos(tmp_path, monkeypatch):
    conversions = []
    convert = type(LT).convert
    monkeypatch.setattr(type(LT), "convert", lambda self, fn, path: conversions.append(path) or convert(self, fn, path))
    method = cam.CamModel(tiny_gap_model(seed=5), input_size=(32, 32), scale=1 / 255, offset=0.0)
    options = {"method": "cam", "input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "top_k": 1}
    key = cache.cache_key(LT, "digest-a", options)
    path, hit = cache.cached_convert(LT, key, method, directory=str(tmp_path))
    assert (hit, len(conversions)) == (False, 1) and path.endswith(".tflite")
    assert cache.cached_convert(LT, key, method, directory=str(tmp_path)) == (path, True) and len(conversions) == 1
    ov = engines.get("openvino")
    if ov.available():
        assert cache.cache_key(ov, "digest-a", options) != key
    # The converter is TensorFlow's: a new TensorFlow converts afresh, as a new LiteRT does.
    assert "+tf-" in LT.version()


@needs_litert
def test_label_on_litert_records_it_and_matches_tensorflow(engine_shards, tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WEAKLOC_CACHE_DIR", str(tmp_path / "cache"))
    run = _label(engine_shards, tiny_model_path, tmp_path / "lt", "--engine", "litert")
    eng = json.loads((tmp_path / "lt" / "summary.json").read_text())["engine"]
    assert (eng["name"], eng["precision"], eng["requested"], eng["cache_hit"]) == ("litert", "f32", "litert", False)
    assert eng["converted"].endswith(".tflite")
    with open(eng["converted"], "rb") as f:
        assert eng["converted_sha256_16"] == files.file_fingerprint(f.read())
    assert run["metrics"]["images_litert_f32"] == run["counts"]["annotated"] == 6
    _label(engine_shards, tiny_model_path, tmp_path / "tf", "--engine", "tensorflow")
    for mine, theirs in zip(_boxes(tmp_path / "lt"), _boxes(tmp_path / "tf")):
        assert [b[0] for b in mine] == [b[0] for b in theirs]
        np.testing.assert_allclose([b[1:] for b in mine], [b[1:] for b in theirs], atol=1e-3)


def test_bf16_and_a_missing_litert_are_one_line_at_launch(engine_shards, tiny_model_path, tmp_path, monkeypatch, capsys):
    if LT.available():
        code = cli.main(["label", "--input", engine_shards, "--model", tiny_model_path, "--output", str(tmp_path / "bf"),
                         "--engine", "litert", "--precision", "bf16", f"--runner={RUNNER}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("weakloc label: error: --engine litert runs f32 only")
        assert not (tmp_path / "bf").exists()
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as if it were not installed
    code = cli.main(["label", "--input", engine_shards, "--model", tiny_model_path, "--output", str(tmp_path / "out"),
                     "--engine", "litert", f"--runner={RUNNER}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("weakloc label: error: --engine litert needs the 'ai_edge_litert'")
    assert "pip install ai-edge-litert" in err[-1] and not (tmp_path / "out").exists()
    fake = engines.ConvertedModel("litert", "x.tflite", "", "f32", "k", (32, 32), 3)
    with pytest.raises(engines.EngineMissingError, match="pip install ai-edge-litert"):
        engines.open_converted(fake)


@needs_litert
def test_gradcam_on_litert_is_refused_at_launch(engine_shards, tiny_model_path, tmp_path):
    with pytest.raises(engines.ConversionError,
                       match=r"--engine litert: LiteRT runs one graph .*GradCamModel.*--engine tensorflow"):
        _label(engine_shards, tiny_model_path, tmp_path / "named", "--method", "gradcam", "--engine", "litert")
    assert not (tmp_path / "named").exists()


@needs_litert
def test_litert_worker_never_imports_tensorflow(engine_shards, tiny_model_path, tmp_path, monkeypatch):
    from weakloc.models import synthetic
    from weakloc.transforms.decode import DecodedInput

    monkeypatch.setenv("WEAKLOC_CACHE_DIR", str(tmp_path / "cache"))
    config, _ = label.prepare(["--input", engine_shards, "--model", tiny_model_path, "--output", str(tmp_path / "out"),
                               "--classes", "both", "--engine", "litert", f"--runner={RUNNER}"])
    assert config.spec.converted is not None and config.spec.converted.engine == "litert"
    handler = inference.CamModelHandler(config.spec, config.box, batch_size=4)
    data = synthetic.make_shapes(4, size=32, seed=2)
    batch = [DecodedInput(annotate.ImageMeta(f"i{i}", "s", 32, 32, label_ids=[i % 3]), data.images[i])
             for i in range(4)]
    worker = run_pickled_worker(handler, batch, str(tmp_path), timeout=300)
    assert worker["modules"] == [] and worker["engine"] == ["litert", "f32"]
    tf_spec = dataclasses.replace(config.spec, converted=None)
    want = inference.CamModelHandler(tf_spec, config.box).run_inference(
        batch, inference.load_cam_model(tf_spec, config.box.top_k))
    for mine, theirs in zip(worker["boxes"], want):
        np.testing.assert_allclose(mine, [[b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]]
                                          for b in theirs["boxes"]], atol=1e-3)
