"""The throughput benchmark still runs end to end against the current code (figures are not checked here)."""
import pytest


@pytest.mark.slow
def test_throughput_script_runs_on_a_tiny_config(tmp_path):
    from tests.benchmarks import throughput

    doc = throughput.main(["--configs", "small", "--images", "16", "--gradcam_images", "2", "--batch_size", "8",
                           "--workdir", str(tmp_path), "--out", str(tmp_path / "bench.json")])
    (r,) = doc["results"]
    assert r["images"] == 16 and (tmp_path / "bench.json").exists()
    # Every measured rate is a positive number and the stage shares add up to one.
    for key in ("forward_limit_img_s", "weakloc_local_img_s", "weakloc_mp2_img_s", "stock_runinference_img_s",
                "tf_keras_vis_gradcam_img_s"):
        assert r[key] > 0, key
    assert sum(r["stage_share"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_pipeline_profile_accounts_for_every_batch(tmp_path):
    from tests.benchmarks import pipeline_profile, throughput

    model = throughput.build_model("small", (32, 32), 3)
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    shards = throughput.write_shards(throughput.make_images(20, (48, 40), "PNG"), str(tmp_path / "shards"), 2)
    doc = pipeline_profile.main(["--input", shards, "--model", model_path, "--output", str(tmp_path / "out"),
                                 "--batch_size", "8", "--input_size", "32,32", "--class_names", "a,b,c"])
    # 20 images in batches of 8 per bundle: the first batch is set apart, the rest form the steady loop.
    assert 0 < doc["steady_images"] < 20 and doc["steady_batches"] >= 1
    assert 0 < doc["model_s"] <= doc["steady_loop_s"] <= doc["wall_s"]
    parts = doc["model_s"] + doc["boxes_s"] + doc["rest_of_handler_s"] + doc["between_batches_s"]
    assert parts == pytest.approx(doc["steady_loop_s"], rel=1e-6)
    from weakloc.models import annotate
    from weakloc.transforms import inference

    assert inference.load_cam_model.__name__ == "load_cam_model", "the timers must not outlive the run"
    assert annotate.annotate_batch.__module__ == "weakloc.models.annotate"
