"""Scheduled (nightly) labelling: duplicate ids are reported, a rerun over a grown input labels only what is new
(--skip_labeled), and a different model than the previous output's is flagged."""
from __future__ import annotations

import pytest

from weakloc.models import records, synthetic
from weakloc.pipeline import label, results
from weakloc.pipeline.options import OptionsError

from tests.helpers import RUNNER, save_model, tiny_gap_model


def run(*argv: str) -> dict:
    return label.run([*argv, f"--runner={RUNNER}"])


def write_shard(path, ids, seed):
    data = synthetic.make_shapes(len(ids), size=40, seed=seed)
    path.write_bytes(b"".join(
        records.frame_record(records.make_example(synthetic.encode_png(data.images[i]), source_id=image_id))
        for i, image_id in enumerate(ids)))


def test_duplicate_ids_are_reported_and_every_row_kept(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # "a" three times (two shards), "b" twice, "c" once; one record with a duplicated id cannot be decoded.
    write_shard(d / "one.tfrecord", ["a", "b", "c", "a"], seed=1)
    write_shard(d / "two.tfrecord", ["a", "b"], seed=2)
    with open(d / "two.tfrecord", "ab") as f:
        f.write(records.frame_record(records.make_example(b"not an image", source_id="c")))
    out = tmp_path / "out"
    summary = run("--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--output", str(out))
    rows = results.read_table(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["a", "a", "a", "b", "b", "c"]  # nothing merged
    assert len({r["source"] for r in rows}) == 6
    dup = summary["counts"]["duplicate_ids"]
    assert dup == {"ids": 3, "rows": 7, "examples": [{"image_id": "a", "rows": 3}, {"image_id": "b", "rows": 2},
                                                     {"image_id": "c", "rows": 2}]}
    assert summary["counts"]["balanced"] is True


def test_no_duplicates_reports_zero(tiny_model_path, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_shard(d / "s.tfrecord", ["x", "y"], seed=3)
    summary = run("--input", str(d / "s.tfrecord"), "--model", tiny_model_path, "--output", str(tmp_path / "o"))
    assert summary["counts"]["duplicate_ids"] == {"ids": 0, "rows": 0, "examples": []}


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, tiny_model_path):
    """Night 1 labels two shards; by night 2 a third shard has arrived (and one old record is duplicated in it)."""
    root = tmp_path_factory.mktemp("nightly")
    d = root / "shards"
    d.mkdir()
    write_shard(d / "day1-a.tfrecord", [f"a{i}" for i in range(4)], seed=4)
    write_shard(d / "day1-b.tfrecord", [f"b{i}" for i in range(3)], seed=5)
    with open(d / "day1-b.tfrecord", "ab") as f:  # a bad record: failed on night 1, tried again on night 2
        f.write(records.frame_record(records.make_example(b"broken", source_id="bad")))
    night1 = run("--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--output", str(root / "n1"))
    write_shard(d / "day2.tfrecord", ["c0", "c1", "a0"], seed=6)  # a0 is a re-sent old image
    night2 = run("--input", str(d / "*.tfrecord"), "--model", tiny_model_path, "--output", str(root / "n2"),
                 "--skip_labeled", str(root / "n1"))
    return root, night1, night2


def test_second_night_labels_only_new_images(nightly):
    root, night1, night2 = nightly
    assert night1["counts"]["annotated"] == 7 and night1["counts"]["failed"] == 1
    ids = sorted(r["image_id"] for r in results.read_table(str(root / "n2")).to_pylist())
    assert ids == ["c0", "c1"]
    counts = night2["counts"]
    # 4 + 3 + 1 + 3 records entered; 7 old + the re-sent a0 skipped; the bad record failed again.
    assert (counts["read"], counts["annotated"], counts["failed"], counts["skipped_labeled"]) == (11, 2, 1, 8)
    assert counts["balanced"] is True
    (fail,) = results.read_table(str(root / "n2"), "failures").to_pylist()
    assert fail["image_id"] == "bad"


def test_second_night_records_the_previous_output_and_same_model(nightly):
    root, night1, night2 = nightly
    (prev,) = night2["skip_labeled"]
    assert prev["output"] == str(root / "n1") and prev["annotated"] == 7
    assert prev["sha256_16"] == night1["model"]["sha256_16"] == night2["model"]["sha256_16"]
    assert prev["same_model"] is True and night2["model_differs_from_previous"] is False
    assert night1["skip_labeled"] == [] and night1["model_differs_from_previous"] is False


def test_skip_labeled_image_files_are_not_even_read(tiny_model_path, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    data = synthetic.make_shapes(5, size=40, seed=7)
    for i in range(3):
        (d / f"{i}.png").write_bytes(synthetic.encode_png(data.images[i]))
    run("--input", str(d / "*.png"), "--model", tiny_model_path, "--output", str(tmp_path / "n1"))
    for i in range(3, 5):
        (d / f"{i}.png").write_bytes(synthetic.encode_png(data.images[i]))
    (d / "0.png").write_bytes(b"")  # unreadable now, but already labelled: never opened again
    # A different model (same classes and input size, other weights) labels night 2: allowed, flagged.
    other = save_model(tiny_gap_model(seed=1), tmp_path, "other", {
        "input_size": [32, 32], "scale": 1 / 255, "offset": 0.0, "class_names": ["cat", "dog", "bird"]})
    night2 = run("--input", str(d / "*.png"), "--model", other, "--output", str(tmp_path / "n2"),
                 "--skip_labeled", str(tmp_path / "n1"))
    rows = results.read_table(str(tmp_path / "n2")).to_pylist()
    assert sorted(r["image_id"] for r in rows) == [str(d / "3.png"), str(d / "4.png")]
    assert (night2["counts"]["read"], night2["counts"]["skipped_labeled"], night2["counts"]["failed"]) == (5, 3, 0)
    assert night2["model_differs_from_previous"] is True
    assert night2["skip_labeled"][0]["same_model"] is False


def test_skip_labeled_refuses_a_directory_without_summary(small_shard, tiny_model_path, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(OptionsError, match="holds no summary.json"):
        run("--input", small_shard, "--model", tiny_model_path, "--output", str(tmp_path / "o"),
            "--skip_labeled", str(tmp_path / "half"))
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("skip_small") / "s.tfrecord"
    write_shard(path, ["s0"], seed=8)
    return str(path)
