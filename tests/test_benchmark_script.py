"""The throughput benchmark still runs end to end against the current code (figures are not checked here)."""
import pytest


@pytest.mark.slow
def test_throughput_script_runs_on_a_tiny_config(tmp_path):
    from tests.benchmarks import throughput

    doc = throughput.main(["--configs", "small", "--images", "16", "--gradcam_images", "2", "--batch_size", "8",
                           "--rounds", "1", "--workdir", str(tmp_path), "--out", str(tmp_path / "bench.json")])
    (r,) = doc["results"]
    assert r["images"] == 16 and (tmp_path / "bench.json").exists()
    # Every measured rate is a positive number and the stage shares add up to one.
    for key in ("forward_limit_img_s", "weakloc_local_img_s", "weakloc_mp2_img_s", "stock_runinference_img_s",
                "tf_keras_vis_gradcam_img_s"):
        assert r[key] > 0, key
    assert sum(r["stage_share"].values()) == pytest.approx(1.0)
    # One round: the limit before and after it, each measured in its own process.
    assert len(r["forward_limit_each_img_s"]) == 2 and min(r["forward_limit_each_img_s"]) > 0
    assert len(r["weakloc_local_marginal_vs_limit_each"]) == 1
    assert r["weakloc_local_steady_img_s"] > 0  # the run's own steady rate, read from its summary.json
    assert "CAM + boxes <= 5% of the forward time" in r["targets"]


def test_interleaved_rounds_divides_each_round_by_the_limits_around_it():
    from tests.benchmarks import throughput

    limits = iter([100.0, 120.0, 80.0])
    # Seconds per run, in call order: round 1 (a: big, small; b: big, small), then round 2.
    seconds = iter([10.0, 4.0, 13.0, 4.0, 20.0, 8.0, 30.0, 6.0])
    steady = iter([130.0, None, 90.0, None, 55.0, None, 40.0, None])  # the big runs' own rates

    def run(big):
        return {"seconds": next(seconds), "steady_img_s": next(steady)}

    doc = throughput.interleaved_rounds(2, lambda: next(limits), {"a": run, "b": run}, 1000, 250)
    assert doc["limits_img_s"] == [100.0, 120.0, 80.0]
    a, b = doc["a"]["rounds"], doc["b"]["rounds"]
    # Round 1: 750 more images in 6 s = 125 img/s against the mean limit 110; round 2: 750 / 12 s against 100.
    assert a[0]["marginal_img_s"] == pytest.approx(125.0) and a[0]["marginal_vs_limit"] == pytest.approx(125 / 110)
    assert a[1]["marginal_vs_limit"] == pytest.approx(62.5 / 100)
    assert b[0]["marginal_vs_limit"] == pytest.approx(750 / 9 / 110)
    assert b[1]["whole_run_vs_limit"] == pytest.approx(1000 / 30 / 100)
    # Start-up: the small run's time less its images at the marginal rate (4 s - 250 / 125 img/s).
    assert a[0]["startup_s"] == pytest.approx(2.0)
    assert doc["a"]["marginal_vs_limit_median"] == pytest.approx((125 / 110 + 0.625) / 2)
    assert a[0]["steady_vs_limit"] == pytest.approx(130 / 110) and a[1]["steady_vs_limit"] == pytest.approx(0.55)
    assert doc["b"]["steady_vs_limit_median"] == pytest.approx((90 / 110 + 40 / 100) / 2)


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
