"""`weakloc export`: hand-computed box conversions, one filter for every format, library validators, round trips.

Expected numbers come from the format definitions (COCO [x, y, w, h], YOLO normalised centres, VOC 1-based
inclusive) worked out by hand, from pycocotools' own loader and evaluator, from real VOC files in ../shared, and
from reading exported TFRecords back through `weakloc label`.
"""
from __future__ import annotations

import json
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml

from weakloc.models import export as fmt
from weakloc.models import records
from weakloc.pipeline import cli, label, results, sources

from tests.helpers import HOSTILE_IDS, RUNNER, shared_path

NAMES = ["cat", "dog", "bird"]


def box(label, xyxy, score=0.9, cam_score=0.5):
    return {"class_id": NAMES.index(label), "label": label, "score": score, "cam_score": cam_score,
            "xmin": xyxy[0], "ymin": xyxy[1], "xmax": xyxy[2], "ymax": xyxy[3]}


def row(image_id, width, height, boxes, gt=()):
    return {"image_id": image_id, "source": f"/data/{image_id}.png", "width": width, "height": height,
            "boxes": list(boxes), "labels": [],
            "gt_boxes": [{"class_id": NAMES.index(lbl), "label": lbl, "xmin": b[0], "ymin": b[1], "xmax": b[2],
                          "ymax": b[3]} for lbl, b in gt]}


# --------------------------------------------------------------------------------------------------------------
# Conversions, worked out by hand
# --------------------------------------------------------------------------------------------------------------

W, H = 100, 50
B = (10.2, 5.0, 30.7, 20.5)


def one_image_set(xyxy=B, label="dog"):
    return fmt.select([row("img", W, H, [box(label, xyxy, score=0.75)])], NAMES, fmt.ExportFilter())


def test_coco_bbox_is_xywh_in_the_same_continuous_pixels():
    ds = fmt.coco_dataset(one_image_set())
    (ann,) = ds["annotations"]
    np.testing.assert_allclose(ann["bbox"], [10.2, 5.0, 20.5, 15.5])
    assert ann["area"] == pytest.approx(20.5 * 15.5)
    assert ann["iscrowd"] == 0 and ann["category_id"] == 2  # dog is the second category, COCO ids are 1-based
    assert ds["images"] == [{"id": 1, "file_name": "img", "width": 100, "height": 50,
                             "weakloc_source": "/data/img.png"}]
    assert [c["name"] for c in ds["categories"]] == NAMES
    (res,) = fmt.coco_results(one_image_set())
    assert res["score"] == 0.75 and res["image_id"] == 1 and res["category_id"] == 2


def test_yolo_line_is_normalised_centre_and_size():
    (line,) = fmt.yolo_lines(one_image_set().images[0]).splitlines()
    cls, cx, cy, w, h = line.split()
    assert cls == "1"  # 0-based
    # centre (20.45, 12.75) and size (20.5, 15.5) over 100 x 50
    np.testing.assert_allclose([float(cx), float(cy), float(w), float(h)], [0.2045, 0.255, 0.205, 0.31], atol=1e-6)


@pytest.mark.parametrize(
    "xyxy, expected",
    [
        ((10.2, 5.0, 30.7, 20.5), (11, 6, 31, 21)),  # edges round to the nearest pixel boundary (half up)
        ((3, 4, 4, 5), (4, 5, 4, 5)),  # the one-pixel box around pixel (row 4, col 3) is that pixel, 1-based
        ((0, 0, 100, 50), (1, 1, 100, 50)),  # the whole image
        ((99.9, 49.9, 100, 50), (100, 50, 100, 50)),  # a sliver at the far corner keeps one pixel, inside
    ],
)
def test_voc_box_is_one_based_inclusive(xyxy, expected):
    assert fmt.voc_box(xyxy, W, H) == expected


def test_voc_xml_parses_and_carries_the_box():
    doc = ET.fromstring(fmt.voc_xml(one_image_set().images[0], "img-x.png"))
    assert doc.findtext("filename") == "img-x.png"
    assert (doc.findtext("size/width"), doc.findtext("size/height")) == ("100", "50")
    (obj,) = doc.findall("object")
    assert obj.findtext("name") == "dog"
    assert [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] == [11, 6, 31, 21]


def test_voc_round_trip_on_real_voc_files():
    """Real VOC boxes read the documented way (x0 = xmin - 1, x1 = xmax) come back as the same integers."""
    folder = shared_path("photos", "fruit", "test")
    checked = 0
    for path in sorted(folder.glob("*.xml"))[:20]:
        doc = ET.parse(path).getroot()
        w, h = int(doc.findtext("size/width")), int(doc.findtext("size/height"))
        if not w or not h:  # some files give 0: the data README says to take the size from the image
            from PIL import Image

            w, h = Image.open(path.with_suffix(".jpg")).size
        for obj in doc.findall("object"):
            voc = tuple(int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            if not (1 <= voc[0] <= voc[2] <= w and 1 <= voc[1] <= voc[3] <= h):
                continue  # a few boxes in the wild run past the image: nothing to round-trip
            weak = (voc[0] - 1, voc[1] - 1, voc[2], voc[3])
            assert fmt.voc_box(weak, w, h) == voc, path.name
            checked += 1
    assert checked >= 20


def test_tf_example_is_normalised_with_one_based_labels():
    ex = records.parse_example(fmt.tf_example(one_image_set().images[0], b"\x89PNG fake", image_format="png"))
    assert ex.image_id == "img" and ex.encoded == b"\x89PNG fake"
    np.testing.assert_allclose(ex.gt_boxes, [[0.102, 0.1, 0.307, 0.41]], rtol=1e-6)
    assert ex.gt_labels == [2] and ex.gt_texts == ["dog"]
    assert ex.labels == [2] and ex.label_texts == ["dog"]


def test_label_map_matches_tf_labels():
    text = fmt.label_map_pbtxt(["cat", "big dog"])
    assert text == 'item {\n  id: 1\n  name: "cat"\n}\nitem {\n  id: 2\n  name: "big dog"\n}\n'


# --------------------------------------------------------------------------------------------------------------
# One filter for every format
# --------------------------------------------------------------------------------------------------------------

ROWS = [
    row("a", 100, 100, [box("cat", (0, 0, 50, 50), score=0.9),  # kept: 25% of the image
                        box("dog", (0, 0, 50, 50), score=0.2),  # score
                        box("bird", (10, 10, 90, 90), score=0.9)]),  # class (dropped by the map)
    row("b", 100, 100, [box("dog", (0, 0, 3, 90), score=0.8),  # side 3 px < 5
                        box("cat", (0, 0, 100, 100), score=0.8),  # area 1.0 > 0.9
                        box("dog", (20, 20, 40, 40), score=0.6, cam_score=0.1)]),  # cam score
    row("c", 100, 100, [box("dog", (10, 10, 40, 60), score=0.95)]),  # kept as "animal"
    row("d", 100, 100, []),  # never had a box
]
FILTER = fmt.ExportFilter(min_score=0.5, min_cam_score=0.3, min_side=5, max_area=0.9,
                          class_map={"dog": "animal", "cat": "animal", "bird": None})


def test_filter_counts_every_reason():
    es = fmt.select(ROWS, NAMES, FILTER)
    assert es.categories == ["animal"]
    assert [im.image_id for im in es.images] == ["a", "c"]  # b and d are left without boxes
    assert es.counts["boxes_dropped"] == {"class": 1, "score": 1, "cam_score": 1, "size": 1, "area": 1}
    assert (es.counts["boxes_in"], es.counts["boxes_out"], es.counts["images_without_boxes"]) == (7, 2, 2)
    kept = fmt.select(ROWS, NAMES, fmt.ExportFilter(**{**FILTER.__dict__, "keep_empty": True}))
    assert [im.image_id for im in kept.images] == ["a", "b", "c", "d"]


def test_every_format_writes_the_same_boxes(tmp_path):
    """The filter is applied once: each format's files hold exactly the two boxes that survive it."""
    es = fmt.select(ROWS, NAMES, FILTER)
    coco = fmt.coco_dataset(es)
    yolo = [fmt.yolo_lines(im).splitlines() for im in es.images]
    voc = [ET.fromstring(fmt.voc_xml(im, "x")).findall("object") for im in es.images]
    tf = [records.parse_example(fmt.tf_example(im, b"x")) for im in es.images]
    assert len(coco["annotations"]) == sum(map(len, yolo)) == sum(map(len, voc)) == 2
    assert [len(t.gt_boxes) for t in tf] == [1, 1]
    assert {o.findtext("name") for objs in voc for o in objs} == {"animal"}
    assert [c["name"] for c in coco["categories"]] == ["animal"]
    assert yaml.safe_load(fmt.yolo_data_yaml(es.categories, "/x"))["names"] == {0: "animal"}


@pytest.mark.parametrize("bad", [dict(min_score=1.5), dict(min_area=0.5, max_area=0.2), dict(min_side=-1)])
def test_filter_refuses_values_that_cannot_work(bad):
    with pytest.raises(fmt.ExportError):
        fmt.ExportFilter(**bad)


def test_class_map_forms():
    assert fmt.parse_class_map("cat=animal, bird=", NAMES) == {"cat": "animal", "bird": None}
    assert fmt.parse_class_map('{"dog": "canine", "bird": null}', NAMES) == {"dog": "canine", "bird": None}
    with pytest.raises(fmt.ExportError, match="zebra"):
        fmt.parse_class_map("zebra=horse", NAMES)
    with pytest.raises(fmt.ExportError, match="pairs"):
        fmt.parse_class_map("cat", NAMES)
    # order follows the model's classes; merged names appear once
    assert fmt.categories_for(NAMES, {"cat": "pet", "dog": "pet"}) == ["pet", "bird"]


# --------------------------------------------------------------------------------------------------------------
# File names from image ids
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", HOSTILE_IDS + ("..", ".hidden", "a\x00b", "x" * 500, "ünï/cødé.jpg"))
def test_safe_stem_stays_inside_the_folder(tmp_path, image_id):
    stem = fmt.safe_stem(image_id)
    assert stem and len(stem) <= 91
    assert "/" not in stem and "\\" not in stem and "\x00" not in stem and not stem.startswith(".")
    target = (tmp_path / (stem + ".txt")).resolve()
    assert target.parent == tmp_path.resolve()
    target.write_text("ok")  # a name the filesystem accepts


def test_safe_stem_is_stable_and_distinct():
    stems = [fmt.safe_stem(i) for i in HOSTILE_IDS]
    assert len(set(stems)) == len(stems)  # "same/name" and "same_name" included
    assert stems == [fmt.safe_stem(i) for i in HOSTILE_IDS]
    assert fmt.safe_stem("gs://b/a.jpg").startswith("gs_b_a-")


# --------------------------------------------------------------------------------------------------------------
# COCO through pycocotools
# --------------------------------------------------------------------------------------------------------------


def test_cocoeval_on_an_exported_pair_gives_the_hand_computed_ap(tmp_path):
    """Two 100x100 images, one true 40x40 cat each. The weak box of image 1 is exact (score 0.9); the one of
    image 2 is shifted by 20 px (IoU 800 / 2400 = 1/3, a miss at every COCO IoU level, score 0.8).

    At each IoU level the ranked detections are TP, FP: precision 1 up to recall 0.5, and recall never passes
    0.5. COCO's 101-point interpolated AP is then 51/101 (recall points 0.00..0.50) at every level, so AP,
    AP50, AP75 and AP(medium: 1600 px^2) all equal 51/101, and AR@100 = 0.5.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rows = [row("i1", 100, 100, [box("cat", (10, 10, 50, 50), score=0.9)], gt=[("cat", (10, 10, 50, 50))]),
            row("i2", 100, 100, [box("cat", (30, 10, 70, 50), score=0.8)], gt=[("cat", (10, 10, 50, 50))])]
    es = fmt.select(rows, NAMES, fmt.ExportFilter())
    (tmp_path / "gt.json").write_text(json.dumps(fmt.coco_dataset(es, ground_truth=True)))
    (tmp_path / "res.json").write_text(json.dumps(fmt.coco_results(es)))
    gt = COCO(str(tmp_path / "gt.json"))
    dt = gt.loadRes(str(tmp_path / "res.json"))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    ap, ap50, ap75, ap_small, ap_medium = ev.stats[:5]
    assert ap == pytest.approx(51 / 101) and ap50 == pytest.approx(51 / 101) and ap75 == pytest.approx(51 / 101)
    assert ap_small == -1  # no small objects
    assert ap_medium == pytest.approx(51 / 101)
    assert ev.stats[8] == pytest.approx(0.5)  # AR@100


# --------------------------------------------------------------------------------------------------------------
# The command, on a real labelling run
# --------------------------------------------------------------------------------------------------------------


def run_export(*argv) -> int:
    return cli.main(["export", *argv])


def test_cli_coco_loads_in_pycocotools(labelled_run, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    assert run_export("--annotations", labelled_run["out"], "--format", "coco", "--output", str(out)) == 0
    rows = results.read_table(labelled_run["out"]).to_pylist()
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == len(rows) == 10
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(labelled_run["class_names"])
    assert len(coco.getAnnIds()) == sum(len(r["boxes"]) for r in rows)
    by_name = {im["file_name"]: im for im in coco.loadImgs(coco.getImgIds())}
    for r in rows:
        im = by_name[r["image_id"]]
        assert (im["width"], im["height"]) == (56, 40)
        got = sorted(tuple(a["bbox"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])))
        want = sorted((b["xmin"], b["ymin"], b["xmax"] - b["xmin"], b["ymax"] - b["ymin"]) for b in r["boxes"])
        np.testing.assert_allclose(got, want, atol=1e-4)
    # the input's true boxes come out as a second dataset, the scored boxes as results for COCOeval
    gt = COCO(str(out / "ground_truth.json"))
    assert len(gt.getAnnIds()) == 10
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.getAnnIds()) == sum(len(r["boxes"]) for r in rows)
    summary = json.loads((out / "export.json").read_text())
    assert summary["counts"]["images_out"] == 10 and summary["format"] == "coco"
    # a second export into the same folder is refused with one line, exit 2
    assert run_export("--annotations", labelled_run["out"], "--format", "coco", "--output", str(out)) == 2


def test_cli_yolo_and_voc_files_named_safely(labelled_run, tmp_path, capsys):
    rows = results.read_table(labelled_run["out"]).to_pylist()
    keep = [r for r in rows if any(b["score"] >= 0.34 for b in r["boxes"])]  # filter computed independently
    for name in ("yolo", "voc"):
        out = tmp_path / name
        assert run_export("--annotations", labelled_run["out"], "--format", name, "--output", str(out),
                          "--min_score", "0.34") == 0
        files = [p for p in out.rglob("*") if p.is_file()]
        assert all(tmp_path in p.resolve().parents for p in files)
        assert not (tmp_path.parent / "etc").exists()
    labels = sorted((tmp_path / "yolo" / "labels").glob("*/*.txt"))
    assert {p.parent.name for p in labels} <= {"train", "val"}
    assert sorted(p.stem for p in labels) == sorted(fmt.safe_stem(r["image_id"]) for r in keep)
    n_lines = sum(len(p.read_text().splitlines()) for p in labels)
    assert n_lines == sum(1 for r in keep for b in r["boxes"] if b["score"] >= 0.34)
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "cat", 1: "dog", 2: "bird"} and data["nc"] == 3
    assert data["path"] == str(tmp_path / "yolo") and (data["train"], data["val"]) == ("images/train", "images/val")
    xmls = sorted((tmp_path / "voc" / "Annotations").iterdir())
    assert sorted(p.stem for p in xmls) == sorted(p.stem for p in labels)
    for p in xmls:
        doc = ET.parse(p).getroot()
        for obj in doc.findall("object"):
            xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= 56 and 1 <= ymin <= ymax <= 40


def test_cli_bad_class_map_exits_2(labelled_run, tmp_path, capsys):
    code = run_export("--annotations", labelled_run["out"], "--format", "yolo", "--output", str(tmp_path / "y"),
                      "--class_map", "zebra=horse")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zebra" in err[0]


def test_image_bytes_come_back_from_files_and_shards(labelled_run, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG file bytes")
    shard = labelled_run["shards"] / "b.tfrecord"  # GZIP
    got = {s: (data, why) for s, data, why in sources.iter_image_bytes(
        [str(img), f"{shard}:1", f"{shard}:99", str(tmp_path / "gone.png")])}
    assert got[str(img)] == (b"\x89PNG file bytes", None)
    assert got[f"{shard}:1"][0][:4] == b"\x89PNG"
    assert got[f"{shard}:99"][0] is None and "fewer records" in got[f"{shard}:99"][1]
    assert got[str(tmp_path / "gone.png")][0] is None


def test_tfrecord_round_trip_through_weakloc_label(labelled_run, tmp_path):
    """Export as TF Object Detection TFRecords, label those with the same model: the same images (bytes re-read
    from the source shards) give the same predictions, and the exported boxes come back as the true boxes."""
    out = tmp_path / "tf"
    assert run_export("--annotations", labelled_run["out"], "--format", "tfrecord", "--output", str(out),
                      "--num_shards", "2") == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["counts"]["images_written"] == 10 and summary["counts"]["images_without_bytes"] == []
    again = tmp_path / "again"
    label.run(["--input", str(out / "*.tfrecord"), "--model", labelled_run["model"], "--output", str(again),
               "--top_k", "2", f"--runner={RUNNER}"])
    def order(b):
        return (b["label"], round(b["xmin"], 2), round(b["ymin"], 2))

    def coords(b):
        return [b[k] for k in ("xmin", "ymin", "xmax", "ymax")]

    first = {r["image_id"]: r for r in results.read_table(labelled_run["out"]).to_pylist()}
    second = {r["image_id"]: r for r in results.read_table(str(again)).to_pylist()}
    assert set(second) == set(first)
    for image_id, r in first.items():
        s = second[image_id]
        assert (s["width"], s["height"]) == (r["width"], r["height"])
        want = sorted(r["boxes"], key=order)
        truth = sorted(s["gt_boxes"], key=order)
        assert [b["label"] for b in truth] == [b["label"] for b in want]
        np.testing.assert_allclose([coords(b) for b in truth], [coords(b) for b in want], atol=1e-3)
        again = sorted(s["boxes"], key=order)  # the same pixels through the same model
        assert [b["label"] for b in again] == [b["label"] for b in want]
        np.testing.assert_allclose([coords(b) + [b["score"]] for b in again],
                                   [coords(b) + [b["score"]] for b in want], atol=1e-4)
        assert sorted(lbl["label"] for lbl in s["labels"]) == sorted({b["label"] for b in r["boxes"]})


def test_tfrecord_leaves_out_images_whose_source_is_gone(labelled_run, tmp_path):
    """Bytes come from the source; a row whose source no longer exists is left out and named in export.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    run.mkdir()
    table = results.read_table(labelled_run["out"])
    src = table.column("source").to_pylist()
    src[0] = str(tmp_path / "moved-away.png")
    table = table.set_column(table.column_names.index("source"), "source", pa.array(src, pa.string()))
    pq.write_table(table, run / "annotations-00000-of-00001.parquet")
    (run / "summary.json").write_text((pathlib.Path(labelled_run["out"]) / "summary.json").read_text())
    out = tmp_path / "tf"
    assert run_export("--annotations", str(run), "--format", "tfrecord", "--output", str(out)) == 0
    counts = json.loads((out / "export.json").read_text())["counts"]
    assert counts["images_out"] == 10 and counts["images_written"] == 9
    assert [m["source"] for m in counts["images_without_bytes"]] == [src[0]]
    with open(out / "weakloc-00000-of-00001.tfrecord", "rb") as f:
        ids = [records.parse_example(r).image_id for _, r in records.iter_records(f)]
    assert len(ids) == 9 and table.column("image_id")[0].as_py() not in ids


@pytest.mark.parametrize("name", ["coco", "yolo", "voc"])
def test_copy_images_puts_each_picture_where_the_format_looks(labelled_run, tmp_path, name):
    from PIL import Image

    out = tmp_path / name
    assert run_export("--annotations", labelled_run["out"], "--format", name, "--output", str(out),
                      "--copy_images") == 0
    if name == "coco":
        pictures = [out / im["file_name"] for im in json.loads((out / "instances.json").read_text())["images"]]
    elif name == "yolo":  # Ultralytics finds labels/<stem>.txt from images/<stem>.<ext>
        pictures = sorted((out / "images").glob("*/*"))
        assert sorted((p.parent.name, p.stem) for p in pictures) == sorted(
            (p.parent.name, p.stem) for p in (out / "labels").glob("*/*.txt"))
    else:
        pictures = [out / "JPEGImages" / ET.parse(p).getroot().findtext("filename")
                    for p in (out / "Annotations").iterdir()]
    assert len(pictures) == 10
    for p in pictures:
        assert p.suffix == ".png" and out.resolve() in p.resolve().parents  # the shards hold PNGs
        assert Image.open(p).size == (56, 40)
    assert json.loads((out / "export.json").read_text())["counts"]["images_copied"] == 10


def test_class_map_file_merges_and_drops_in_the_command(labelled_run, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cat": "animal", "dog": "animal", "bird": None}))
    out = tmp_path / "yolo"
    assert run_export("--annotations", labelled_run["out"], "--format", "yolo", "--output", str(out),
                      "--class_map", str(mapping)) == 0
    rows = results.read_table(labelled_run["out"]).to_pylist()
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "animal"}
    lines = [ln for p in (out / "labels").glob("*/*.txt") for ln in p.read_text().splitlines()]
    assert len(lines) == sum(1 for r in rows for b in r["boxes"] if b["label"] in ("cat", "dog"))
    assert {ln.split()[0] for ln in lines} <= {"0"}
    dropped = json.loads((out / "export.json").read_text())["counts"]["boxes_dropped"]
    assert dropped["class"] == sum(1 for r in rows for b in r["boxes"] if b["label"] == "bird")


def test_tfrecords_parse_with_tensorflows_own_reader(labelled_run, tmp_path):
    """TensorFlow's TFRecordDataset and parse_single_example, with the feature spec of the TF Object Detection
    API's decoder, read what we wrote: sizes match the decoded pictures, boxes are normalised, labels 1-based."""
    import tensorflow as tf

    out = tmp_path / "tf"
    assert run_export("--annotations", labelled_run["out"], "--format", "tfrecord", "--output", str(out)) == 0
    spec = {
        "image/encoded": tf.io.FixedLenFeature((), tf.string),
        "image/format": tf.io.FixedLenFeature((), tf.string),
        "image/height": tf.io.FixedLenFeature((), tf.int64),
        "image/width": tf.io.FixedLenFeature((), tf.int64),
        "image/source_id": tf.io.FixedLenFeature((), tf.string),
        **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in ("xmin", "ymin", "xmax", "ymax")},
        "image/object/class/label": tf.io.VarLenFeature(tf.int64),
        "image/object/class/text": tf.io.VarLenFeature(tf.string),
    }
    rows = {r["image_id"]: r for r in results.read_table(labelled_run["out"]).to_pylist()}
    seen = 0
    for raw in tf.data.TFRecordDataset(str(out / "weakloc-00000-of-00001.tfrecord")):
        ex = tf.io.parse_single_example(raw, spec)
        row = rows[ex["image/source_id"].numpy().decode()]
        pixels = tf.io.decode_image(ex["image/encoded"]).numpy()
        assert pixels.shape[:2] == (int(ex["image/height"]), int(ex["image/width"])) == (row["height"], row["width"])
        assert ex["image/format"].numpy() == b"png"
        xmin = tf.sparse.to_dense(ex["image/object/bbox/xmin"]).numpy()
        xmax = tf.sparse.to_dense(ex["image/object/bbox/xmax"]).numpy()
        np.testing.assert_allclose(sorted(xmin), sorted(b["xmin"] / row["width"] for b in row["boxes"]), atol=1e-6)
        assert (xmin < xmax).all() and (xmax <= 1.0).all()
        labels = tf.sparse.to_dense(ex["image/object/class/label"]).numpy()
        texts = [t.decode() for t in tf.sparse.to_dense(ex["image/object/class/text"], default_value=b"").numpy()]
        assert [int(lbl) - 1 for lbl in labels] == [labelled_run["class_names"].index(t) for t in texts]
        seen += 1
    assert seen == 10


def test_split_source_tells_records_from_files(tmp_path):
    shard = tmp_path / "x.tfrecord"
    shard.write_bytes(b"")
    odd = tmp_path / "photo:3"  # a file name that looks like a record source; no file "photo" exists
    odd.write_bytes(b"")
    assert sources.split_source(f"{shard}:12") == (str(shard), 12)
    assert sources.split_source(str(odd)) == (str(odd), None)
    assert sources.split_source(str(tmp_path / "a.png")) == (str(tmp_path / "a.png"), None)


@pytest.mark.parametrize("fmt, truth", [("tfrecord", "*.tfrecord"), ("coco", "instances.json")])
def test_exported_boxes_read_back_as_ground_truth_by_evaluate(labelled_run, tmp_path, fmt, truth):
    """A run scored against its own exported boxes: every (image, class) pair finds its box again (IoU 1)."""
    from weakloc.pipeline import evaluate

    out = tmp_path / fmt
    assert run_export("--annotations", labelled_run["out"], "--format", fmt, "--output", str(out)) == 0
    rows = results.read_table(labelled_run["out"]).to_pylist()
    pairs = {(r["image_id"], b["class_id"]) for r in rows for b in r["boxes"]}
    ev = evaluate.run(["--annotations", labelled_run["out"], "--ground_truth", str(out / truth),
                       "--output", str(tmp_path / "evaluation.json")])
    assert ev["pairs"] == len(pairs) and ev["rows_without_ground_truth"] == 0
    assert ev["gt_known"][0.7] == 1.0 and ev["mean_iou"] == pytest.approx(1.0, abs=1e-4)


def test_yolo_split_is_stable_and_near_its_share():
    ids = [f"/data/photos/img_{i:05d}.jpg" for i in range(2000)]
    splits = [fmt.yolo_split(i, 10.0) for i in ids]
    assert splits == [fmt.yolo_split(i, 10.0) for i in ids]
    assert 150 <= splits.count("val") <= 250  # 10% of 2000, within a wide binomial margin
    assert all(fmt.yolo_split(i, 0.0) == "train" for i in ids[:50])


def test_export_stems_are_relative_to_the_pictures_folder():
    ims = [fmt.ExportImage(image_id=p, source=p, width=1, height=1, boxes=[], gt_boxes=[])
           for p in ("/data/photos/fruit/test/apple_77.jpg", "/data/photos/kangaroo/images/00001.jpg")]
    stems = fmt.export_stems(ims)
    assert stems[ims[0].image_id].startswith("fruit_test_apple_77-")
    assert stems[ims[1].image_id].startswith("kangaroo_images_00001-")
    records = [fmt.ExportImage(image_id="a.tfrecord:3", source="a.tfrecord:3", width=1, height=1, boxes=[],
                               gt_boxes=[])]
    assert fmt.export_stems(records)["a.tfrecord:3"] == fmt.safe_stem("a.tfrecord:3")
