"""Ground truth and labels from where users keep them (issue 15): VOC XML beside the pictures, COCO, TFRecords,
CSV/JSONL manifests; and the VOC-folder path through calibrate, label, evaluate and report."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from weakloc.models import groundtruth, metrics
from weakloc.pipeline import cli, ground_truth, inputs
from weakloc.pipeline.options import OptionsError
from tests.helpers import RUNNER, shared_path


def voc_xml(filename: str, objects, size=(0, 0)) -> str:
    """A Pascal VOC document; `objects` are (name, x0, y0, x1, y1) continuous pixels, written 1-based inclusive;
    `size` the (width, height) it declares."""
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{x0 + 1:g}</xmin><ymin>{y0 + 1:g}</ymin><xmax>{x1:g}</xmax>"
                   f"<ymax>{y1:g}</ymax></bndbox></object>" for n, x0, y0, x1, y1 in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"</size>{objs}</annotation>")


def test_manifest_csv_and_jsonl():
    csv_text = "path,label\nimgs/a.jpg,cat\nimgs/b.jpg,cat, dog\n\nc.jpg,\n"
    assert groundtruth.parse_manifest(csv_text, jsonl=False) == {"imgs/a.jpg": ["cat"], "imgs/b.jpg": ["cat", "dog"],
                                                                 "c.jpg": []}
    jsonl = '{"path": "a.jpg", "labels": ["cat", "dog"]}\n{"path": "b.jpg", "label": "bird"}\n'
    assert groundtruth.parse_manifest(jsonl, jsonl=True) == {"a.jpg": ["cat", "dog"], "b.jpg": ["bird"]}
    with pytest.raises(groundtruth.GroundTruthError, match="line 1"):
        groundtruth.parse_manifest('["a.jpg"]\n', jsonl=True)


def test_manifest_labels_reach_the_examples(tmp_path):
    """Labels from a manifest (relative paths), not from the folder the pictures happen to lie in."""
    from PIL import Image

    (tmp_path / "pics" / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "pics" / "images" / f"{name}.png")
    (tmp_path / "pics" / "labels.csv").write_text("images/a.png,cat\nimages/b.png,dog,cat\n")
    manifest = ground_truth.load_manifest(str(tmp_path / "pics" / "labels.csv"))
    source = inputs.scan([str(tmp_path / "pics" / "*" / "*.png")], manifest=manifest)
    assert source.class_names == ("cat", "dog")  # not "images"
    got = {ex.image_id.rsplit("/", 1)[-1]: ex.label_ids for ex in inputs.iterate(source)}
    assert got == {"a.png": [0], "b.png": [1, 0], "c.png": []}


def test_folder_label_problems():
    assert "none of them is a model class" in groundtruth.folder_label_problem({"images"}, ["kangaroo"])
    assert groundtruth.folder_label_problem({"kangaroo", "raccoon"}, ["kangaroo", "raccoon"]) is None
    assert "looks like a layout folder" in groundtruth.folder_label_problem({"images", "cat"})
    assert groundtruth.folder_label_problem({"cat", "dog"}) is None


def test_shrunk_class_threshold_is_the_weighted_mean():
    """(n t_c + k t) / (n + k): a class fitted on 10 maps at 0.60 with the overall choice 0.30 and k = 10 -> 0.45."""
    class S:  # the two Sweep fields class_threshold reads
        def __init__(self, t):
            self.best_threshold = t

    cal = metrics.Calibration(S(0.30), {0: S(0.60), 1: S(0.20)}, {0: 10, 1: 30, 2: 3})
    assert cal.class_threshold(0, 10) == pytest.approx(0.45)
    assert cal.class_threshold(1, 10) == pytest.approx(round((30 * 0.2 + 10 * 0.3) / 40, 2))
    assert cal.class_threshold(2, 10) == pytest.approx(0.30)  # not fitted: the overall one
    assert dict(cal.thresholds(["a", "b", "c"], shrink=0).per_class) == {"a": 0.60, "b": 0.20}


def test_edge_thresholds_warn_loudly():
    from weakloc.pipeline import calibrate

    from weakloc.models.thresholds import Thresholds

    lines = calibrate.edge_warnings(Thresholds(default=0.0, per_class={"cat": 0.99, "dog": 0.4}))
    assert len(lines) == 2 and "default = 0.00" in lines[0] and "full-image boxes" in lines[0]
    assert "cat = 0.99" in lines[1]


def test_ground_truth_lookup_by_id_name_and_stem(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(voc_xml("a.jpg", [("cat", 0, 10, 20, 20)]))
    truth = ground_truth.load([str(tmp_path / "voc")])
    assert truth.pixel_boxes("/data/x/a.png", "/data/x/a.png", 40, 40) == [("cat", [0.0, 10.0, 20.0, 20.0])]
    assert truth.find("b.jpg") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionsError, match="without any Pascal VOC"):
        ground_truth.load([str(tmp_path / "empty")])


@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory, shapes_model):
    """40 shapes pictures (PNG, lossless) with VOC XML beside each, and the same pictures and boxes as a TFRecord."""
    from PIL import Image

    from weakloc.models import records, synthetic

    _, _ = shapes_model
    data = synthetic.make_shapes(40, size=48, seed=21)
    root = tmp_path_factory.mktemp("voc_folder")
    folder = root / "photos"
    folder.mkdir()
    frames = []
    for i, (img, label, box) in enumerate(zip(data.images, data.labels, data.boxes)):
        name = data.class_names[label]
        Image.fromarray(img).save(folder / f"pic_{i:03d}.png")
        x0, y0, x1, y1 = (float(round(v)) for v in box)
        (folder / f"pic_{i:03d}.xml").write_text(voc_xml(f"pic_{i:03d}.png", [(name, x0, y0, x1, y1)]))
        frames.append(records.frame_record(records.make_example(
            synthetic.encode_png(img), source_id=f"pic_{i:03d}", label_texts=[name],
            boxes=[[x0 / 48, y0 / 48, x1 / 48, y1 / 48]], box_texts=[name], width=48, height=48)))
    (root / "same.tfrecord").write_bytes(b"".join(frames))
    return root


@pytest.mark.slow
def test_voc_folder_through_calibrate_label_evaluate_report(tmp_path, capsys, shapes_model, voc_folder):
    model, _ = shapes_model
    pics = str(voc_folder / "photos" / "*.png")
    # calibrate on the folder as it lies (XML beside the pictures), and on the same boxes in a TFRecord: one curve.
    assert cli.main(["calibrate", "--input", pics, "--model", model, "--output", str(tmp_path / "voc.json")]) == 0
    printed = capsys.readouterr().out
    assert "5-fold CV" in printed and "written:" in printed
    assert cli.main(["calibrate", "--input", str(voc_folder / "same.tfrecord"), "--model", model, "--output",
                     str(tmp_path / "rec.json")]) == 0
    by_voc, by_rec = (json.loads((tmp_path / n).read_text()) for n in ("voc.json", "rec.json"))
    # the same pictures and boxes by either route: the same choice, to the last threshold
    assert by_voc["default"] == by_rec["default"] and by_voc["per_class"] == by_rec["per_class"]
    assert by_voc.get("method") == by_rec.get("method")

    labels = tmp_path / "labels"
    assert cli.main(["label", "--input", pics, "--model", model, "--thresholds", str(tmp_path / "voc.json"),
                     "--output", str(labels), "--classes", "both", "--emit_cams", f"--runner={RUNNER}"]) == 0
    assert "annotated rows:  40" in capsys.readouterr().out
    # evaluate with the VOC folder, and with the TFRecord's boxes: the pictures meet their truth by stem either way.
    assert cli.main(["evaluate", "--annotations", str(labels), "--ground_truth", str(voc_folder / "photos")]) == 0
    ev = json.loads((labels / "evaluation.json").read_text())
    assert ev["images"] == 40 and ev["rows_without_ground_truth"] == 0
    assert cli.main(["evaluate", "--annotations", str(labels), "--ground_truth", str(voc_folder / "same.tfrecord"),
                     "--output", str(tmp_path / "ev2.json")]) == 0
    ev2 = json.loads((tmp_path / "ev2.json").read_text())
    assert ev2["gt_known"] == ev["gt_known"] and ev2["mean_iou"] == pytest.approx(ev["mean_iou"])
    assert ev["gt_known"]["0.5"] > ev["baselines"]["full_image"]["gt_known"]["0.5"]
    capsys.readouterr()
    # report with the same truth: the figures, the true boxes and every image's IoU.
    out = tmp_path / "report"
    assert cli.main(["report", "--annotations", str(labels), "--output", str(out), "--ground_truth",
                     str(voc_folder / "photos")]) == 0
    page = (out / "index.html").read_text()
    assert "GT-known Loc" in page and "Worst IoU" in page and "IoU " in page


def test_calibrate_on_the_real_fruit_test_folder(tmp_path, capsys):
    """../shared/data/photos/fruit/test is a folder of JPEGs with VOC XML beside them: calibrate takes it as is."""
    from tests.helpers import save_model, tiny_gap_model

    folder = shared_path("photos", "fruit", "test")
    model = save_model(tiny_gap_model(), tmp_path, "fruit", {"input_size": [32, 32], "scale": 1 / 255, "offset": 0.0,
                                                             "class_names": ["apple", "banana", "orange"]})
    assert cli.main(["calibrate", "--input", str(folder / "*.jpg"), "--model", model, "--output",
                     str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    xml_objects = sum(len({n for n, _ in groundtruth.voc_boxes(p.read_text())[3]}) for p in folder.glob("*.xml"))
    assert doc["calibration"]["images"] == len(list(folder.glob("*.jpg")))
    assert doc["calibration"]["pairs"] == xml_objects  # one map per (picture, class it has boxes of)


def rotated_jpeg(path, orientation, stored_box, stored_size=(64, 40)):
    """A JPEG of `stored_size` (w, h) pixels, black but for a white `stored_box` (x0y0x1y1 of the stored pixels),
    tagged with EXIF `orientation`."""
    import io

    from PIL import Image

    img = Image.new("RGB", stored_size)
    img.paste((255, 255, 255), tuple(stored_box))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    path.write_bytes(buf.getvalue())


def white_box(pixels):
    """x0y0x1y1 (max exclusive) of the white pixels of a decoded uint8 (H, W, 3) picture: where the object is."""
    import numpy as np

    ys, xs = np.nonzero(pixels.mean(axis=2) > 128)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("frame", ["stored", "seen", "unknown"])
def test_voc_boxes_turn_with_the_exif_rotation(tmp_path, orientation, frame):
    """A VOC box drawn on the stored pixels (labelImg; the XML says the stored size, or 0x0) turns with the picture;
    one drawn on the rotated picture (the XML says the rotated size) is kept. Either way it lands on the white
    rectangle of the picture weakloc decodes, found independently from the pixels."""
    import numpy as np

    from PIL import Image, ImageOps

    stored_box, stored_size = (6, 4, 26, 14), (64, 40)  # off-centre, so a wrong turn misses it
    jpg = tmp_path / "pics" / "a.jpg"
    jpg.parent.mkdir()
    rotated_jpeg(jpg, orientation, stored_box, stored_size)
    with Image.open(jpg) as im:
        seen_img = ImageOps.exif_transpose(im)
        seen_size = seen_img.size
        truth_seen = white_box(np.asarray(seen_img))
    if frame == "seen":
        if seen_size == stored_size:
            pytest.skip("orientation 3 keeps the size: the XML cannot say it was drawn on the rotated picture")
        xml_box, size = truth_seen, seen_size
    else:
        xml_box, size = stored_box, stored_size if frame == "stored" else (0, 0)
    (tmp_path / "pics" / "a.xml").write_text(voc_xml("a.jpg", [("thing", *xml_box)], size))
    truth = ground_truth.beside_images([str(jpg)])
    (name, got), = truth.pixel_boxes(str(jpg), str(jpg), *seen_size)
    assert name == "thing"
    np.testing.assert_allclose(got, truth_seen, atol=1.0)  # JPEG blurs the edge by up to a pixel
    # As calibrate reads it: decoded pixels and the truth, normalised, in the same frame.
    source = inputs.scan([str(jpg)], class_names=("thing",), labels_from_folder="no")
    source.ground_truth = truth
    ex, = inputs.iterate(source, input_size=seen_size[::-1])
    np.testing.assert_allclose(ex.gt_boxes[0] * np.tile(seen_size, 2), white_box(ex.pixels), atol=1.5)


def test_datasets_images_takes_ground_truth_and_keeps_rotated_boxes_right(tmp_path, capsys):
    """`datasets images --ground_truth VOC_DIR`: the shards hold the pictures, their labels from the object names,
    and boxes that land on the object once weakloc decodes the (EXIF-rotated) picture."""
    import numpy as np

    pics, xml = tmp_path / "pics", tmp_path / "boxes"  # not a folder name looked for beside the pictures
    pics.mkdir()
    xml.mkdir()
    for i in range(6):
        box = (4 + i, 3, 30 + i, 17)
        rotated_jpeg(pics / f"p{i}.jpg", 6 if i % 2 else 1, box)
        (xml / f"p{i}.xml").write_text(voc_xml(f"p{i}.jpg", [("thing", *box)], (64, 40)))
    (pics / "stray.jpg").write_bytes((pics / "p0.jpg").read_bytes())  # no truth: left out, counted
    out = tmp_path / "shards"
    assert cli.main(["datasets", "images", "--input", str(pics / "*.jpg"), "--ground_truth", str(xml),
                     "--output", str(out), "--calib_per_class", "1", "--test_percent", "34"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    splits = {k: v["images"] for k, v in doc["splits"].items()}
    assert splits == {"train": 3, "calib": 1, "test": 2, "skipped_unreadable": 0, "without_ground_truth": 1}
    source = inputs.scan([str(out / "*.tfrecord")])
    assert source.class_names == ("thing",)
    seen = 0
    for ex in inputs.iterate(source, input_size=(64, 64)):
        h, w = ex.height, ex.width
        want = np.array(white_box(ex.pixels), np.float32) / 64 * np.array([w, h, w, h])
        np.testing.assert_allclose(ex.gt_boxes[0] * np.array([w, h, w, h]), want, atol=2.0)
        seen += (w, h) == (40, 64)  # the rotated ones
    assert seen == 3
    # Without --ground_truth and no XML beside the pictures: one line, exit 2.
    assert cli.main(["datasets", "images", "--input", str(pics / "*.jpg"), "--output", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("weakloc datasets: error: no true boxes")


def test_calibrate_and_export_show_progress_with_a_total(tmp_path, caplog, monkeypatch, shapes_model, voc_folder):
    """Every progress line of the loops outside Beam names done/total; an interval of 0 makes each item report."""
    from weakloc.pipeline import progress

    monkeypatch.setattr(progress, "COUNTED_INTERVAL", 0.0)
    model, _ = shapes_model
    pics = str(voc_folder / "photos" / "*.png")
    with caplog.at_level(logging.INFO, logger="weakloc.pipeline.progress"):
        assert cli.main(["calibrate", "--input", pics, "--model", model, "--output", str(tmp_path / "t.json"),
                         "--candidates", "cam,contrast"]) == 0
        lines = [r.getMessage() for r in caplog.records]
        assert "calibrate: pictures read: 40/40 (100%)" in " ".join(lines)
        assert any(line.startswith("calibrate: kinds of map computed: 1/2 (50%)") and "ETA" in line for line in lines)
        caplog.clear()
        labels = tmp_path / "labels"
        assert cli.main(["label", "--input", pics, "--model", model, "--thresholds", str(tmp_path / "t.json"),
                         "--output", str(labels), f"--runner={RUNNER}"]) == 0
        assert cli.main(["export", "--annotations", str(labels), "--format", "yolo", "--copy_images", "--output",
                         str(tmp_path / "yolo")]) == 0
        lines = [r.getMessage() for r in caplog.records]
        assert any(line.startswith("export: pictures copied: 20/40 (50%)") for line in lines), lines
        caplog.clear()
        ev = cli.main(["evaluate", "--annotations", str(labels), "--ground_truth", str(voc_folder / "photos")])
        assert ev == 0
        lines = [r.getMessage() for r in caplog.records]
        for what in ("rows scored", "rows matched", "full_image baseline rows matched"):
            assert any(line.startswith(f"evaluate: {what}: 20/40 (50%)") for line in lines), (what, lines)


@pytest.fixture(scope="module")
def layout_folder(tmp_path_factory):
    """12 pictures under root/images/ (a layout folder, never a class): i % 3 == 0 holds a cat and a dog, the other
    even ones a cat, the odd ones a dog. Beside them the same labels as VOC XML, a COCO file and a CSV manifest."""
    from PIL import Image

    root = tmp_path_factory.mktemp("layout")
    (root / "images").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    manifest, expected = [], {"cat": 0, "dog": 0, "both": 0}
    for i in range(12):
        names = ["cat", "dog"] if i % 3 == 0 else (["cat"] if i % 2 == 0 else ["dog"])
        for n in names:
            expected[n] += 1
        expected["both"] += len(names) > 1
        name = f"p{i:02d}.png"
        Image.fromarray(np.full((24, 24, 3), 20 * i, np.uint8)).save(root / "images" / name)
        objects = [(n, 2 + 10 * k, 2, 11 + 10 * k, 20) for k, n in enumerate(names)]
        (root / "images" / f"p{i:02d}.xml").write_text(voc_xml(name, objects, size=(24, 24)))
        coco["images"].append({"id": i + 1, "file_name": name, "width": 24, "height": 24})
        coco["annotations"] += [{"id": len(coco["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                 "category_id": 1 if n == "cat" else 2, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                 "area": (x1 - x0) * (y1 - y0)} for n, x0, y0, x1, y1 in objects]
        manifest.append(",".join([f"images/{name}", *names]))
    (root / "instances.json").write_text(json.dumps(coco))
    (root / "labels.csv").write_text("\n".join(manifest) + "\n")
    return root, expected


@pytest.mark.parametrize("where", ["voc", "coco", "manifest"])
def test_train_takes_labels_from_objects_or_a_manifest_not_the_layout_folder(tmp_path, caplog, layout_folder,
                                                                            where):
    """`train --ground_truth VOC_DIR|COCO.json` labels each picture by its objects' names, `--labels` by its
    manifest line: the classes are cat and dog (never `images`), two-object pictures count for both classes."""
    root, expected = layout_folder
    flag = {"voc": ["--ground_truth", str(root / "images")], "coco": ["--ground_truth", str(root / "instances.json")],
            "manifest": ["--labels", str(root / "labels.csv")]}[where]
    out = tmp_path / "m.keras"
    with caplog.at_level(logging.INFO, logger="weakloc"):
        assert cli.main(["train", "--input", str(root / "images" / "*.png"), *flag, "--output", str(out),
                         "--input_size", "24,24", "--epochs", "1", "--width", "2", "--batch_size", "4",
                         "--val_percent", "25"]) == 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["class_names"] == ["cat", "dog"]
    counts = side["training"]["label_counts"]
    assert {n: counts["train"]["per_class"][n] + counts["validation"]["per_class"][n] for n in ("cat", "dog")} \
        == {"cat": expected["cat"], "dog": expected["dog"]}
    assert counts["train"]["multi_label"] + counts["validation"]["multi_label"] == expected["both"]
    assert counts["train"]["images"] + counts["validation"]["images"] == 12
    logged = caplog.text
    assert "12 inputs in 12 files, 2 classes: cat, dog" in logged and f"({expected['both']} with several labels)" in logged


def test_export_writes_the_coco_truth_from_a_voc_folder(tmp_path, shapes_model, voc_folder):
    """Pictures read as plain files carry no boxes: `export --ground_truth VOC_DIR` still writes COCO's
    ground_truth.json, every XML box there in COCO's x, y, w, h; without the flag there is no truth to write."""
    from pycocotools.coco import COCO

    from weakloc.models import synthetic

    model, _ = shapes_model
    labels = tmp_path / "labels"
    assert cli.main(["label", "--input", str(voc_folder / "photos" / "*.png"), "--model", model, "--output",
                     str(labels), f"--runner={RUNNER}"]) == 0
    assert cli.main(["export", "--annotations", str(labels), "--format", "coco", "--output", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "ground_truth.json").exists()
    assert cli.main(["export", "--annotations", str(labels), "--format", "coco", "--output", str(tmp_path / "coco"),
                     "--ground_truth", str(voc_folder / "photos")]) == 0
    gt = COCO(str(tmp_path / "coco" / "ground_truth.json"))
    data = synthetic.make_shapes(40, size=48, seed=21)  # the fixture's pictures and boxes
    want = {f"pic_{i:03d}": (data.class_names[label], [float(round(v)) for v in box])
            for i, (label, box) in enumerate(zip(data.labels, data.boxes))}
    got = {}
    for im in gt.loadImgs(gt.getImgIds()):
        (ann,) = gt.loadAnns(gt.getAnnIds(imgIds=[im["id"]]))
        x, y, w, h = ann["bbox"]
        stem = im["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        got[stem] = (gt.loadCats(ann["category_id"])[0]["name"], [x, y, x + w, y + h])
    assert got.keys() == want.keys()
    for stem, (name, box) in want.items():
        assert got[stem][0] == name and got[stem][1] == pytest.approx(box, abs=1e-4), stem
