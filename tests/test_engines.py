"""Inference engines (models/engines, pipeline/engine.py): OpenVINO runs the fused CAM graph as TensorFlow does,
conversions are cached by content hash, workers on OpenVINO never import TensorFlow, and every refusal is one
clear line at launch."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from weakloc.models import annotate, cam, engines, files
from weakloc.models.engines import cache
from weakloc.pipeline import cli, label, results
from weakloc.transforms import inference
from tests.helpers import RUNNER, tiny_gap_model
from tests.worker import run_pickled_worker

OV = engines.get("openvino")
needs_openvino = pytest.mark.skipif(not OV.available(), reason="needs openvino (pip install openvino)")
NAMES = ("cat", "dog", "bird")


def converted(method, tmp_path, precision="f32", engine=OV) -> engines.EngineCam:
    """`method`'s fused graph converted by `engine` and loaded back, as a worker gets it."""
    path = str(tmp_path / f"graph{engine.suffix}")
    engine.convert(cache.fused_function(method), path)
    with open(path, "rb") as f:
        forward = engine.load(f.read(), precision)
    return engines.EngineCam(forward, input_size=method.input_size, num_classes=method.num_classes,
                             engine=engine.name, precision=precision)


def boxes_of(out, extra):
    metas = [annotate.ImageMeta(f"i{i}", "s", 64, 48) for i in range(len(out.scores))]
    rows = annotate.annotate_batch(out, metas, NAMES, annotate.BoxOptions(classes="both", top_k=2), "m", extra)
    return [[(b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in r["boxes"]] for r in rows]


@needs_openvino
@pytest.mark.parametrize("activation,flip_tta,contrast", [("softmax", False, False), ("linear", True, True)])
def test_openvino_gives_tensorflows_scores_cams_and_boxes_at_any_batch_size(tmp_path, activation, flip_tta,
                                                                            contrast):
    model = tiny_gap_model(activation=activation, seed=3)
    tf_cam = cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2, flip_tta=flip_tta,
                          contrast=contrast)
    ov_cam = converted(tf_cam, tmp_path)
    images = np.random.default_rng(7).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    extra = np.array([[1, -1], [0, 2], [-1, -1], [2, 1], [0, -1]], np.int32)
    want, got = tf_cam(images, extra), ov_cam(images, extra)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    np.testing.assert_array_equal(got.top_classes, want.top_classes)
    np.testing.assert_array_equal(got.cam_classes, want.cam_classes)
    np.testing.assert_allclose(got.low_res, want.low_res, atol=1e-5 * np.abs(want.low_res).max())
    for mine, theirs in zip(boxes_of(got, extra), boxes_of(want, extra)):
        assert [b[0] for b in mine] == [b[0] for b in theirs]
        np.testing.assert_allclose([b[1:] for b in mine], [b[1:] for b in theirs], atol=1e-3)
    for i in range(len(images)):  # batch 1 gives what batch 5 gave
        one = ov_cam(images[i : i + 1], extra[i : i + 1])
        np.testing.assert_allclose(one.low_res[0], got.low_res[i], atol=1e-6 * np.abs(got.low_res).max())
        np.testing.assert_allclose(one.scores[0], got.scores[i], atol=1e-7)
    with pytest.raises(ValueError, match="expected uint8 images of shape"):
        ov_cam(images[:, :16])


@needs_openvino
def test_openvino_throughput_queue_returns_the_latency_path_outputs_in_image_order(tmp_path, monkeypatch):
    """The THROUGHPUT hint's async queue cuts a batch into sub-batches run on several requests at once and puts
    the outputs back in image order: every output equals the one-request LATENCY path's, for a batch that is not
    a multiple of the sub-batch and for one shorter than it."""
    from weakloc.models.engines import openvino as ov_engine

    tf_cam = cam.CamModel(tiny_gap_model(seed=5), input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    path = str(tmp_path / "graph.ovir.tar")
    OV.convert(cache.fused_function(tf_cam), path)
    data = open(path, "rb").read()
    monkeypatch.setenv("WEAKLOC_OPENVINO_HINT", "latency")
    latency = OV.load(data, "f32")
    monkeypatch.setenv("WEAKLOC_OPENVINO_HINT", "throughput")
    queued = OV.load(data, "f32")
    assert (latency.mode, queued.mode) == ("latency", "throughput")
    queued.requests = max(queued.requests, 2)  # a one-core host's optimum is 1; the queue must still be right
    images = np.random.default_rng(9).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    extra = np.random.default_rng(10).integers(-1, 3, (11, 2)).astype(np.int32)
    for n in (11, 3):
        want, got = latency(images[:n], extra[:n]), queued(images[:n], extra[:n])
        assert len(got) == len(want) == 5
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-6 * max(1.0, float(np.abs(w).max())))
    # The same image gives the same CAM wherever it falls in a batch: reversed order, reversed outputs.
    back, maps = queued(images[::-1].copy(), extra[::-1].copy())[4], latency(images, extra)[4]
    np.testing.assert_allclose(back[::-1], maps, atol=1e-6 * np.abs(maps).max())
    monkeypatch.setenv("WEAKLOC_OPENVINO_HINT", "fastest")
    with pytest.raises(engines.EngineError, match="WEAKLOC_OPENVINO_HINT must be one of"):
        OV.load(data, "f32")
    assert ov_engine.DEFAULT_HINT in ov_engine.HINTS


@needs_openvino
@pytest.mark.parametrize("layer", [None, "c1"])
def test_openvino_returns_the_feature_map_co_localization_reads(tmp_path, layer):
    """A co-localization method's graph (the head's features, or --coloc_layer's) converts with its feature map
    as a sixth output, equal to TensorFlow's; the plain CAM graph keeps five and returns no features."""
    from weakloc.models import coloc

    model = tiny_gap_model(seed=4)
    tf_col = coloc.ColocModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2, coloc_layer=layer)
    ov_col = converted(tf_col, tmp_path)
    images = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    extra = np.array([[1], [-1], [2], [0]], np.int32)
    want, got = tf_col(images, extra), ov_col(images, extra)
    assert got.features.shape == want.features.shape == (4, *((32, 32) if layer else (16, 16)), 8)
    np.testing.assert_allclose(got.features, want.features, atol=1e-5 * np.abs(want.features).max())
    np.testing.assert_allclose(got.low_res, want.low_res, atol=1e-5 * np.abs(want.low_res).max())
    plain = converted(cam.CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0), tmp_path)
    assert plain(images).features is None


@needs_openvino
def test_bf16_runs_the_same_graph_close_to_f32(tmp_path):
    tf_cam = cam.CamModel(tiny_gap_model(seed=4), input_size=(32, 32), scale=1 / 255, offset=0.0)
    images = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    want, got = tf_cam(images), converted(tf_cam, tmp_path, "bf16")(images)
    assert got.low_res.shape == want.low_res.shape
    # bf16 keeps 8 bits of mantissa: close, not equal (the shared MobileNetV2's figures are in BENCHMARKS.md).
    np.testing.assert_allclose(got.scores, want.scores, atol=3e-2)


def test_auto_precision_is_f32_as_measured_and_names_are_checked():
    assert engines.base.AUTO_BF16 is False  # bf16 missed the 99% agreement targets (BENCHMARKS.md)
    assert OV.resolve_precision("auto") == "f32" and OV.resolve_precision("bf16") == "bf16"
    with pytest.raises(engines.EngineError, match="precision must be one of"):
        OV.resolve_precision("fp16")


@needs_openvino
def test_conversion_cache_hits_and_misses_by_content_hash(tmp_path, monkeypatch):
    conversions = []
    convert = type(OV).convert
    monkeypatch.setattr(type(OV), "convert", lambda self, fn, path: conversions.append(path) or convert(self, fn, path))

    def method(seed):
        return cam.CamModel(tiny_gap_model(seed=seed), input_size=(32, 32), scale=1 / 255, offset=0.0)

    options = {"method": "cam", "input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "top_k": 1}
    key = cache.cache_key(OV, "digest-a", options)
    path, hit = cache.cached_convert(OV, key, method(5), directory=str(tmp_path))
    assert (hit, len(conversions)) == (False, 1) and os.path.exists(path)
    again, hit = cache.cached_convert(OV, key, method(5), directory=str(tmp_path))
    assert (again, hit, len(conversions)) == (path, True, 1), "a hit converts nothing"
    # Other weights, options or engine versions give other keys; the same ones the same key.
    assert cache.cache_key(OV, "digest-a", dict(options)) == key
    keys = {key, cache.cache_key(OV, "digest-b", options), cache.cache_key(OV, "digest-a", {**options, "top_k": 2}),
            cache.cache_key(OV, "digest-a", {**options, "contrast": True})}
    monkeypatch.setattr(type(OV), "version", lambda self: "0.0.0-other")
    keys.add(cache.cache_key(OV, "digest-a", options))
    assert len(keys) == 5
    other, hit = cache.cached_convert(OV, cache.cache_key(OV, "digest-b", options), method(6),
                                      directory=str(tmp_path))
    assert (hit, len(conversions)) == (False, 2) and other != path
    assert not [p for p in os.listdir(os.path.dirname(path)) if ".part-" in p], "no partial file left behind"
    # A file's model is named by its bytes; keras:NAME (no file) by its name, weights and Keras version.
    spec = lambda **kw: types.SimpleNamespace(**{"fingerprint": "", "path": "keras:MobileNetV2",  # noqa: E731
                                                 "keras_weights": "imagenet", **kw})
    assert cache.model_digest(spec(fingerprint="00ff")) == "00ff"
    assert cache.model_digest(spec()) != cache.model_digest(spec(keras_weights="w.h5"))


@needs_openvino
def test_openvino_keeps_what_it_compiled_for_the_next_worker_on_the_host(tmp_path, caplog):
    tf_cam = cam.CamModel(tiny_gap_model(seed=5), input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    path = str(tmp_path / "graph.ovir.tar")
    OV.convert(cache.fused_function(tf_cam), path)
    with open(path, "rb") as f:
        data = f.read()
    folder = cache.compiled_dir(OV, files.file_fingerprint(data), str(tmp_path / "cache"))
    first, again, plain = (OV.load(data, "f32", cache_dir=folder), OV.load(data, "f32", cache_dir=folder),
                           OV.load(data, "f32"))
    assert (first.loaded_from_cache, again.loaded_from_cache, plain.loaded_from_cache) == (False, True, False)
    assert os.listdir(folder), "the compiled graph is kept in the artifact's own folder"
    # A folder that cannot be made: compiled without the cache, with a warning, never a failed worker.
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    unwritable = OV.load(data, "f32", cache_dir=str(blocked / "compiled"))
    assert not unwritable.loaded_from_cache and "compiling without it" in caplog.text
    images = np.random.default_rng(9).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    extra = np.zeros((3, 0), np.int32)
    want = plain(images, extra)
    for forward in (first, again, unwritable):
        for mine, theirs in zip(forward(images, extra), want):
            np.testing.assert_array_equal(mine, theirs)


def test_unconvertible_graph_is_a_clear_conversion_error(tmp_path):
    if not OV.available():
        pytest.skip("needs openvino (pip install openvino)")
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8), tf.TensorSpec([None, None], tf.int32)])
    def forward(images, extra):
        x = tf.numpy_function(lambda a: a.astype(np.float32), [images], tf.float32)  # a Python op: no IR for it
        return x, extra, x, extra, x

    with pytest.raises(engines.ConversionError, match="No conversion rule found for operations: PyFunc"):
        OV.convert(forward, str(tmp_path / "x.ovir.tar"))
    assert not (tmp_path / "x.ovir.tar").exists()


def _label(engine_shards, model, out, *extra):
    return label.run(["--input", engine_shards, "--model", model, "--output", str(out), "--classes", "both",
                      f"--runner={RUNNER}", *extra])


def _boxes(out):
    rows = sorted(results.read_table(str(out)).to_pylist(), key=lambda r: r["image_id"])
    return [[(b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in r["boxes"]] for r in rows]


@needs_openvino
def test_label_runs_openvino_by_default_records_it_and_matches_tensorflow(engine_shards, tiny_model_path, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("WEAKLOC_CACHE_DIR", str(tmp_path / "cache"))
    first = _label(engine_shards, tiny_model_path, tmp_path / "ov")
    on_disk = json.loads((tmp_path / "ov" / "summary.json").read_text())
    eng = on_disk["engine"]
    assert (eng["name"], eng["precision"], eng["requested"], eng["cache_hit"]) == ("openvino", "f32", "auto", False)
    with open(eng["converted"], "rb") as f:
        assert eng["converted_sha256_16"] == files.file_fingerprint(f.read())
    # What the workers ran, counted by them.
    assert first["metrics"]["images_openvino_f32"] == first["counts"]["annotated"] == 6
    second = _label(engine_shards, tiny_model_path, tmp_path / "ov2")
    assert second["engine"]["cache_hit"] is True and second["engine"]["converted"] == eng["converted"]
    tf_run = _label(engine_shards, tiny_model_path, tmp_path / "tf", "--engine", "tensorflow")
    assert tf_run["engine"]["name"] == "tensorflow" and tf_run["metrics"]["images_tensorflow_f32"] == 6
    for mine, theirs in zip(_boxes(tmp_path / "ov"), _boxes(tmp_path / "tf")):
        assert [b[0] for b in mine] == [b[0] for b in theirs]
        np.testing.assert_allclose([b[1:] for b in mine], [b[1:] for b in theirs], atol=1e-3)


def test_missing_engine_is_one_line_naming_the_install(engine_shards, tiny_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    code = cli.main(["label", "--input", engine_shards, "--model", tiny_model_path, "--output", str(tmp_path / "out"),
                     "--engine", "openvino", f"--runner={RUNNER}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("weakloc label: error: --engine openvino needs the 'openvino' package")
    assert "pip install openvino" in err[-1] and not (tmp_path / "out").exists()
    # auto goes on with TensorFlow and says why.
    summary = _label(engine_shards, tiny_model_path, tmp_path / "auto")
    assert summary["engine"]["name"] == "tensorflow" and "not installed" in summary["engine"]["reason"]
    # A worker handed a converted graph where the engine is absent refuses with the same line.
    fake = engines.ConvertedModel("openvino", "x.ovir.tar", "", "f32", "k", (32, 32), 3)
    with pytest.raises(engines.EngineMissingError, match="pip install openvino"):
        engines.open_converted(fake)


@needs_openvino
def test_model_the_engine_cannot_convert_fails_at_launch_or_falls_back(engine_shards, tiny_model_path, tmp_path):
    # Grad-CAM's graph holds gradient ops OpenVINO has no rule for: refused at launch when asked for by name...
    with pytest.raises(engines.ConversionError, match=r"--engine openvino: OpenVINO cannot convert .*No "
                                                      r"conversion rule .*Grad.*--engine tensorflow"):
        _label(engine_shards, tiny_model_path, tmp_path / "named", "--method", "gradcam", "--engine", "openvino")
    assert not (tmp_path / "named").exists()
    # ...and run on TensorFlow with --engine auto, as documented.
    summary = _label(engine_shards, tiny_model_path, tmp_path / "auto", "--method", "gradcam")
    assert summary["engine"]["name"] == "tensorflow" and "gradcam" in summary["engine"]["reason"]
    assert summary["counts"]["annotated"] == 6


def test_auto_takes_tensorflow_for_gpu_workers():
    from apache_beam.options.pipeline_options import PipelineOptions

    from weakloc.pipeline import engine

    assert engines.choose("auto", gpu=True)[0].name == "tensorflow"
    if OV.available():
        assert engines.choose("auto", gpu=False)[0].name == "openvino"
    gpu = PipelineOptions(["--runner=DataflowRunner",
                           "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1"])
    assert engine.workers_have_gpu(gpu) is True
    assert engine.workers_have_gpu(PipelineOptions(["--runner=DataflowRunner"])) is False


@needs_openvino
def test_openvino_worker_never_imports_tensorflow_and_checks_the_graph_hash(engine_shards, tiny_model_path, tmp_path,
                                                                           monkeypatch):
    from weakloc.models import synthetic
    from weakloc.transforms.decode import DecodedInput

    monkeypatch.setenv("WEAKLOC_CACHE_DIR", str(tmp_path / "cache"))
    config, _ = label.prepare(["--input", engine_shards, "--model", tiny_model_path, "--output", str(tmp_path / "out"),
                               "--classes", "both", f"--runner={RUNNER}"])
    assert config.spec.converted is not None
    handler = inference.CamModelHandler(config.spec, config.box, batch_size=4)
    data = synthetic.make_shapes(4, size=32, seed=2)
    batch = [DecodedInput(annotate.ImageMeta(f"i{i}", "s", 32, 32, label_ids=[i % 3]), data.images[i])
             for i in range(4)]
    worker = run_pickled_worker(handler, batch, str(tmp_path), timeout=300)
    assert worker["modules"] == [] and worker["engine"] == ["openvino", "f32"]
    # Nor scipy (0.25-0.45 s of start-up): the default box mode never needs it.
    assert worker["optional_modules"] == []
    # Its boxes are TensorFlow's (run here, from the Keras file).
    tf_spec = dataclasses.replace(config.spec, converted=None)
    want = inference.CamModelHandler(tf_spec, config.box).run_inference(
        batch, inference.load_cam_model(tf_spec, config.box.top_k))
    for mine, theirs in zip(worker["boxes"], want):
        np.testing.assert_allclose(mine, [[b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]]
                                          for b in theirs["boxes"]], atol=1e-3)
    # A graph replaced since launch is refused, as a replaced model file is.
    tampered = tmp_path / "tampered.ovir.tar"
    shutil.copy(config.spec.converted.path, tampered)
    with open(tampered, "ab") as f:
        f.write(b"\0" * 512)
    other = dataclasses.replace(config.spec.converted, path=str(tampered))
    with pytest.raises(RuntimeError, match="changed since the job started"):
        engines.open_converted(other)
