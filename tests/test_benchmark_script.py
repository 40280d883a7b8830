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
