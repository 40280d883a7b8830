"""The weak-supervision loop end to end on generated data: datasets -> train -> calibrate -> label -> evaluate,
plus the ground-truth readers of `evaluate` (VOC, COCO) against hand-computed boxes."""
import json

import numpy as np
import pytest

from weakloc.models import groundtruth
from weakloc.pipeline import cli, ground_truth, results
from tests.helpers import RUNNER, shared_path


@pytest.mark.slow
def test_train_calibrate_label_evaluate_on_shapes(tmp_path, capsys):
    data, model = tmp_path / "data", tmp_path / "m" / "shapes.keras"
    assert cli.main(["datasets", "shapes", "--output", str(data), "--train", "800", "--eval", "80", "--calib", "24",
                     "--size", "48"]) == 0
    assert cli.main(["train", "--input", str(data / "train-*.tfrecord"), "--output", str(model), "--epochs", "4",
                     "--input_size", "48,48", "--width", "8", "--batch_size", "32", "--flip_augment"]) == 0
    side = json.loads((tmp_path / "m" / "shapes.json").read_text())
    # Class names come from the records' image/class/text, sorted; the sidecar says what the model saw.
    assert side["class_names"] == sorted(["circle", "square", "triangle", "cross"])
    assert side["input_size"] == [48, 48] and side["training"]["images"] == 800
    assert side["training"]["final_feature_map"] == [12, 12]
    thr = tmp_path / "m" / "shapes.thresholds.json"
    assert cli.main(["calibrate", "--input", str(data / "calib-*.tfrecord"), "--model", str(model),
                     "--output", str(thr), "--min_per_class", "4", "--cam_contrast", "--refine_boxes"]) == 0
    doc = json.loads(thr.read_text())
    assert 0.0 <= doc["default"] <= 1.0 and doc["calibration"]["pairs"] == 24
    # --refine_boxes: the flags' method with and without the refinement, kept only where cross-validation gained.
    cv = {c["name"]: c["cv_accuracy"] for c in doc["candidates"]}
    assert set(cv) == {"flags", "flags_refine"} and doc["cam_contrast"] is True
    refined = doc["method"]["name"] == "flags_refine"
    assert ("box_refine" in doc) == refined
    if cv["flags_refine"] is not None:
        assert refined == (sum(cv["flags_refine"]) > sum(cv["flags"]))
    if not refined:
        assert set(doc["per_class"]) == set(side["class_names"])  # 6 calibration images per class >= 4
    assert len(doc["calibration"]["curve"]) == 100
    labels = tmp_path / "labels"
    assert cli.main(["label", "--input", str(data / "eval-*.tfrecord"), "--model", str(model),
                     "--output", str(labels), f"--runner={RUNNER}"]) == 0
    summary = results.read_summary(str(labels))
    assert summary["options"]["thresholds_file"] == str(thr)  # picked up beside the model
    assert summary["options"]["per_class_thresholds"] == doc["per_class"]
    assert summary["options"]["cam_contrast"] is True  # followed the calibration without a flag
    assert summary["options"]["box_refine"] == refined
    capsys.readouterr()
    assert cli.main(["evaluate", "--annotations", str(labels)]) == 0
    printed = capsys.readouterr().out
    assert "GT-known Loc (weakloc)" in printed and "centred median box" in printed
    ev = json.loads((labels / "evaluation.json").read_text())
    assert ev["images"] == 80 and ev["pairs"] == 80
    # Same scores when the truth is read back from the shards instead of the rows.
    assert cli.main(["evaluate", "--annotations", str(labels), "--ground_truth", str(data / "eval-*.tfrecord"),
                     "--output", str(tmp_path / "ev2.json")]) == 0
    ev2 = json.loads((tmp_path / "ev2.json").read_text())
    assert ev2["gt_known"] == ev["gt_known"] and ev2["rows_without_ground_truth"] == 0
    # A short run on clutter still learns: far above chance (25%) and above the full-image box.
    assert ev["top1"] >= 0.6
    assert ev["gt_known"]["0.5"] > ev["baselines"]["full_image"]["gt_known"]["0.5"] + 0.2


def test_voc_corners_become_continuous_pixels():
    xml = """<annotation><filename>a.jpg</filename><size><width>0</width><height>0</height></size>
      <object><name>apple</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
      <object><name>pear</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
    </annotation>"""
    name, w, h, objs = groundtruth.voc_boxes(xml)
    # 1-based inclusive 1..10 covers 10 pixels: [0, 10) in continuous coordinates; a one-pixel box is 1 wide.
    assert (name, w, h) == ("a.jpg", 0, 0)
    assert objs == [("apple", [0.0, 10.0, 10.0, 20.0]), ("pear", [4.0, 4.0, 5.0, 5.0])]


def _rows():
    box = dict(class_id=0, label="apple", score=0.9, cam_score=0.5, xmin=0.0, ymin=10.0, xmax=10.0, ymax=20.0)
    return [{"image_id": "/p/a.jpg", "source": "/p/a.jpg", "width": 40, "height": 40, "boxes": [box],
             "classes": [dict(class_id=0, label="apple", score=0.9)], "gt_boxes": []}]


def test_ground_truth_from_voc_folder_and_coco_json(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>apple</name><bndbox><xmin>1</xmin><ymin>11</ymin>"
        "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    rows = _rows()
    assert ground_truth.attach_to_rows(rows, ground_truth.load([str(tmp_path / "voc")]), ["apple", "pear"]) == 1
    assert rows[0]["gt_boxes"][0] == dict(class_id=0, label="apple", xmin=0, ymin=10, xmax=20, ymax=20)
    coco = {"images": [{"id": 7, "file_name": "x/a.jpg"}], "categories": [{"id": 3, "name": "pear"}],
            "annotations": [{"image_id": 7, "category_id": 3, "bbox": [5, 5, 10, 20]}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    rows = _rows()
    assert ground_truth.attach_to_rows(rows, ground_truth.load([str(tmp_path / "gt.json")]), ["apple", "pear"]) == 1
    assert rows[0]["gt_boxes"][0] == dict(class_id=1, label="pear", xmin=5, ymin=5, xmax=15, ymax=25)
    # Box [0,10,10,20] vs VOC truth [0,10,20,20]: IoU 100/200 = 0.5 (hand-computed), scored by evaluate_rows.
    rows = _rows()
    ground_truth.attach_to_rows(rows, ground_truth.load([str(tmp_path / "voc")]), ["apple", "pear"])
    from weakloc.models import metrics

    ev = metrics.evaluate_rows(rows, ["apple", "pear"])
    assert ev["mean_iou"] == pytest.approx(0.5) and ev["gt_known"][0.5] == 1.0 and ev["gt_known"][0.7] == 0.0


def test_cli_datasets_offline_without_idx_dir_exits_2(tmp_path, capsys, monkeypatch):
    import keras

    def fail():
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fail)
    assert cli.main(["datasets", "cluttered-mnist", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--idx_dir" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # nothing half-made


def test_cli_train_refuses_inputs_without_labels(tmp_path, capsys):
    from weakloc.models import records

    path = tmp_path / "x.tfrecord"
    from weakloc.models import synthetic

    img = synthetic.encode_png(np.zeros((8, 8, 3), np.uint8))
    path.write_bytes(records.frame_record(records.make_example(img, source_id="a")))
    assert cli.main(["train", "--input", str(path), "--output", str(tmp_path / "m.keras")]) == 2
    assert "no image-level labels" in capsys.readouterr().err


def test_datasets_photos_from_shared_voc_files(tmp_path):
    root = shared_path("photos")
    from weakloc.pipeline import datasets, inputs

    doc = datasets.run(["photos", "--root", str(root), "--output", str(tmp_path / "p"), "--calib_per_class", "3"])
    splits = doc["splits"]
    # Fruit keeps its own 240/60 split; kangaroo (164) and raccoon (200) lose 20% each to test: 33 + 40.
    total = splits["train"]["images"] + splits["calib"]["images"] + splits["test"]["images"]
    assert total + splits["skipped_unreadable"]["images"] == 300 + 164 + 200
    assert splits["test"]["images"] == 60 + 33 + 40
    assert splits["calib"]["images"] == 5 * 3
    src = inputs.scan([str(tmp_path / "p" / "calib-*.tfrecord")])
    assert src.class_names == ("apple", "banana", "kangaroo", "orange", "raccoon")
    for ex in inputs.iterate(src):
        assert len(ex.gt_boxes) >= 1 and ((ex.gt_boxes >= 0) & (ex.gt_boxes <= 1)).all()
