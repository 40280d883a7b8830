"""One box per object (`--boxes instances`) on hand-drawn maps with exact expected boxes, and its calibration."""
import numpy as np
import pytest

from weakloc.models import boxes

Rule = boxes.InstanceRule


def _two_blobs():
    """A 10x12 map: a 3x3 blob at peak 1.0 (rows 1-3, cols 1-3) and a 3x4 blob at 0.8 (rows 6-8, cols 7-10)."""
    m = np.zeros((1, 10, 12), np.float32)
    m[0, 1:4, 1:4] = 1.0
    m[0, 6:9, 7:11] = 0.8
    return m


def test_two_separate_blobs_give_two_exact_boxes_with_their_own_peaks():
    found = boxes.boxes_from_cams(_two_blobs(), 0.5, mode="instances", instances=Rule(0.1, 0.0, 0.5))
    # Ordered by decreasing peak; max edge exclusive.
    assert found.xyxy.tolist() == [[1, 1, 4, 4], [7, 6, 11, 9]]
    assert found.peak.tolist() == pytest.approx([1.0, 0.8])
    assert found.area.tolist() == [9, 12]
    assert found.map_index.tolist() == [0, 0]
    # "largest" gives the bigger blob only, whatever its peak.
    assert boxes.boxes_from_cams(_two_blobs(), 0.5).xyxy.tolist() == [[7, 6, 11, 9]]


def test_relative_area_and_peak_drop_the_weaker_instance_but_never_the_largest():
    # 9 px vs 12 px: relative area 0.75, so a 0.8 area bar drops the small blob (the largest always stays).
    assert boxes.boxes_from_cams(_two_blobs(), 0.5, mode="instances",
                                 instances=Rule(0.8, 0.0, 0.5)).xyxy.tolist() == [[7, 6, 11, 9]]
    # A peak bar of 0.9 would drop the 0.8 blob, but it is the largest component: kept, with the 1.0 blob.
    assert len(boxes.boxes_from_cams(_two_blobs(), 0.5, mode="instances", instances=Rule(0.1, 0.9, 0.5)).xyxy) == 2
    m = _two_blobs()
    m[0, 0, 11] = 0.6  # a third, one-pixel component: relative area 1/12, peak 0.6
    kept = boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.05, 0.0, 0.5)).xyxy.tolist()
    assert kept == [[1, 1, 4, 4], [7, 6, 11, 9], [11, 0, 12, 1]]
    assert boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.05, 0.7, 0.5)).xyxy.tolist() == kept[:2]
    assert boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.1, 0.0, 0.5)).xyxy.tolist() == kept[:2]


def test_touching_blobs_are_one_instance():
    # Two squares that touch at a corner are one 8-connected component: one box around both.
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 1:4, 1:4] = 1.0
    m[0, 4:7, 4:7] = 0.9
    found = boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.0, 0.0, 1.0))
    assert found.xyxy.tolist() == [[1, 1, 7, 7]]
    assert found.peak.tolist() == pytest.approx([1.0])
    # Above the saddle they split: at tau 0.95 only the first square remains.
    assert boxes.boxes_from_cams(m, 0.95, mode="instances").xyxy.tolist() == [[1, 1, 4, 4]]


def test_one_blob_gives_one_box_equal_to_largest():
    m = np.zeros((1, 9, 9), np.float32)
    m[0, 2:7, 3:8] = np.outer(np.hanning(5), np.hanning(7)[1:6]) + 0.01
    normed, valid = boxes.normalize_cams(m)
    for tau in (0.1, 0.3, 0.6):
        inst = boxes.boxes_from_cams(normed, tau, valid=valid, mode="instances", instances=Rule(0.0, 0.0, 0.5))
        assert inst.xyxy.tolist() == boxes.boxes_from_cams(normed, tau, valid=valid).xyxy.tolist()
        assert inst.peak.tolist() == [1.0]


def _ring_and_core(ring, core):
    """A 20x20 map: a one-pixel ring on the border at value `ring` around a 16x16 core at `core` it does not
    touch (a gap of one pixel): two components with nested boxes [0, 0, 20, 20] and [2, 2, 18, 18]."""
    m = np.zeros((1, 20, 20), np.float32)
    m[0, [0, -1], :] = ring
    m[0, :, [0, -1]] = ring
    m[0, 2:18, 2:18] = core
    return m


def test_nms_removes_a_nested_duplicate():
    # IoU of the nested boxes: 256 / 400 = 0.64. Relative area of the ring: 76 / 256.
    m = _ring_and_core(1.0, 0.7)
    assert boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.0, 0.0, 0.7)).xyxy.tolist() == [
        [0, 0, 20, 20], [2, 2, 18, 18]]
    # At NMS IoU 0.5 the core, with the lower peak, is suppressed although it is the larger component.
    gone = boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.0, 0.0, 0.5))
    assert gone.xyxy.tolist() == [[0, 0, 20, 20]] and gone.peak.tolist() == pytest.approx([1.0])
    # The lower peak goes, whichever box it is: with the core brighter, the ring goes.
    m = _ring_and_core(0.7, 1.0)
    assert boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.0, 0.0, 0.5)).xyxy.tolist() == [
        [2, 2, 18, 18]]


def test_instances_are_batched_maps_apart_and_nms_never_crosses_maps():
    a = _two_blobs()[0]
    stack = np.stack([a, np.zeros_like(a), a])  # the middle map is empty
    found = boxes.boxes_from_cams(stack, np.array([0.5, 0.5, 0.9]), mode="instances", instances=Rule(0.0, 0.0, 0.0))
    # Map 2 at tau 0.9 keeps the 1.0 blob only; map 1 has no foreground. Identical boxes in maps 0 and 2 do
    # not suppress each other.
    assert found.map_index.tolist() == [0, 0, 2]
    assert found.xyxy.tolist() == [[1, 1, 4, 4], [7, 6, 11, 9], [1, 1, 4, 4]]
    one_by_one = [boxes.boxes_from_cams(stack[i : i + 1], t, mode="instances", instances=Rule(0.0, 0.0, 0.0))
                  for i, t in enumerate((0.5, 0.5, 0.9))]
    assert sum((f.xyxy.tolist() for f in one_by_one), []) == found.xyxy.tolist()


def test_instance_rule_refuses_values_outside_unit_range():
    for bad in (dict(min_rel_area=-0.1), dict(min_peak=1.5), dict(nms_iou=True), dict(nms_iou="0.5")):
        with pytest.raises(ValueError, match="instance rule"):
            Rule(**bad)
    assert Rule.from_json(Rule(0.2, 0.3, 0.4).to_json()) == Rule(0.2, 0.3, 0.4)
    with pytest.raises(ValueError, match="expected an object"):
        Rule.from_json({"min_area": 0.1})


@pytest.mark.slow
def test_calibrate_chooses_the_rule_label_follows_and_evaluate_scores_as_a_detector(tiny_model_path, tmp_path):
    """calibrate --boxes instances writes its rule; label --boxes instances reads it and boxes calibrate's own
    maps exactly as `boxes_from_cams` does with that rule, each box scored probability x peak; evaluate adds
    the detector scores, whose full-image baseline is checked against the truths' own areas."""
    import json

    from tests.helpers import RUNNER
    from tests.helpers import png_bytes
    from weakloc.models import opening, records, synthetic
    from weakloc.pipeline import calibrate, cli, inputs, results

    data = synthetic.make_shapes(24, size=40, seed=3)
    shard = tmp_path / "boxed.tfrecord"
    shard.write_bytes(b"".join(records.frame_record(records.make_example(
        png_bytes(data.images[i]), source_id=f"b{i}", labels=[int(data.labels[i]) % 3],
        boxes=[list(np.asarray(data.boxes[i]) / 40)], box_labels=[int(data.labels[i]) % 3])) for i in range(24)))
    thr = tmp_path / "thr.json"
    assert cli.main(["calibrate", "--input", str(shard), "--model", tiny_model_path, "--output", str(thr),
                     "--boxes", "instances", "--min_per_class", "100"]) == 0
    doc = json.loads(thr.read_text())
    rule = boxes.InstanceRule.from_json(doc["instances"])
    out = tmp_path / "o"
    assert cli.main(["label", "--input", str(shard), "--model", tiny_model_path, "--output", str(out),
                     "--thresholds", str(thr), "--classes", "labels", "--boxes", "instances",
                     f"--runner={RUNNER}"]) == 0
    assert results.read_summary(str(out))["options"]["instances"] == rule.to_json()
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}

    opened = opening.open_model(tiny_model_path)
    model, prep = opened.build(), opened.spec.prep
    examples = list(inputs.iterate(inputs.scan([str(shard)], class_names=prep.class_names),
                                   input_size=prep.input_size))
    normed, valid, _, classes, _, _ = calibrate.class_maps(model, iter(examples))
    want = boxes.boxes_from_cams(normed, doc["default"], valid=valid, mode="instances", instances=rule)
    for i, ex in enumerate(examples):
        mine = want.map_index == i
        got = [b for b in rows[ex.image_id]["boxes"] if b["class_id"] == classes[i]]
        assert len(got) == mine.sum()
        xyxy = boxes.scale_boxes(want.xyxy[mine], prep.input_size, (ex.height, ex.width))
        np.testing.assert_allclose([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in got], xyxy, atol=1e-4)
        prob = {c["class_id"]: c["score"] for c in rows[ex.image_id]["classes"]}.get(int(classes[i]))
        if prob is not None:  # the class is among the top-k: its box scores are prob x peak
            np.testing.assert_allclose([b["score"] for b in got], prob * want.peak[mine], rtol=1e-5)

    assert cli.main(["evaluate", "--annotations", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert set(ev["detection"]) >= {"ap", "ap50", "ar100", "instance_recall"}
    assert ev["detection"]["instances"] == 24 and ev["detection"]["predicted_boxes"] == len(want.map_index)
    # One object an image: the full-image box finds a truth at IoU >= 0.5 exactly when it covers half the image.
    rel = [(b[2] - b[0]) * (b[3] - b[1]) / 1600 for b in np.asarray(data.boxes, np.float64)]
    full = ev["baselines"]["full_image"]["detection"]
    assert full["instance_recall"] == pytest.approx(np.mean([r >= 0.5 for r in rel]))


def test_thresholds_file_carries_the_rule_and_refuses_a_bad_one():
    from weakloc.models.thresholds import Thresholds, ThresholdsError

    doc = {"default": 0.3, "instances": {"min_rel_area": 0.2, "min_peak": 0.5, "nms_iou": 0.3}, "other": 1}
    thr = Thresholds.from_json(doc)
    assert thr.instances == Rule(0.2, 0.5, 0.3)
    assert Thresholds.from_json(thr.to_json()).to_json() == thr.to_json() and thr.to_json()["other"] == 1
    with pytest.raises(ThresholdsError, match=r"nms_iou must be a number within \[0, 1\].*\(in t.json\)"):
        Thresholds.from_json({"instances": {"nms_iou": 2}}, where="t.json")


def _touching_gaussians():
    """A 20x28 map of two equal Gaussians (sigma 2.5) centred at (row 10, col 10) and (row 10, col 17): above
    tau 0.3 they are one component (the saddle at col 13.5 reaches about 0.55), and by symmetry a watershed from
    their peaks splits it between columns 13 and 14."""
    yy, xx = np.mgrid[0:20, 0:28].astype(np.float32)
    m = sum(np.exp(-((yy - 10) ** 2 + (xx - cx) ** 2) / (2 * 2.5 ** 2)) for cx in (10, 17))
    return boxes.normalize_cams(m[None])


def test_touching_blobs_split_at_their_peaks_into_two_boxes():
    normed, valid = _touching_gaussians()
    whole = boxes.boxes_from_cams(normed, 0.3, valid=valid, mode="instances", instances=Rule(0.0, 0.0, 0.5))
    assert len(whole.xyxy) == 1  # no peak split: one component, one box
    x0, y0, x1, y1 = whole.xyxy[0].tolist()
    assert x0 < 10 and x1 > 18 and y0 < 10 < y1
    split = boxes.boxes_from_cams(normed, 0.3, valid=valid, mode="instances", instances=Rule(0.0, 0.0, 0.5, 0.1))
    # Left half up to the symmetry line, right half from it; together the unsplit box. Equal peaks and areas.
    assert sorted(split.xyxy.tolist()) == [[x0, y0, 14, y1], [14, y0, x1, y1]]
    assert split.peak.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    assert split.area.tolist()[0] == split.area.tolist()[1] == whole.area[0] // 2
    # Peaks 7 px apart merge when the distance asked is larger (0.3 of 28 px = 8 px): one box again.
    far = boxes.boxes_from_cams(normed, 0.3, valid=valid, mode="instances", instances=Rule(0.0, 0.0, 0.5, 0.3))
    assert far.xyxy.tolist() == whole.xyxy.tolist()


def test_single_blob_stays_one_box_with_peak_split():
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    normed, valid = boxes.normalize_cams(np.exp(-((yy - 7) ** 2 + (xx - 9) ** 2) / 8.0)[None])
    for tau in (0.2, 0.5):
        largest = boxes.boxes_from_cams(normed, tau, valid=valid)
        split = boxes.boxes_from_cams(normed, tau, valid=valid, mode="instances", instances=Rule(0.0, 0.0, 0.5, 0.1))
        assert split.xyxy.tolist() == largest.xyxy.tolist()
        assert split.peak.tolist() == pytest.approx([1.0])


def test_peak_split_keeps_separate_components_and_maps_apart():
    # Two maps: the two separate blobs (each component its own peak) and an empty one, split or not alike.
    m = np.concatenate([_two_blobs(), np.zeros((1, 10, 12), np.float32)])
    plain = boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.1, 0.0, 0.5))
    split = boxes.boxes_from_cams(m, 0.5, mode="instances", instances=Rule(0.1, 0.0, 0.5, 0.15))
    assert split.xyxy.tolist() == plain.xyxy.tolist() == [[1, 1, 4, 4], [7, 6, 11, 9]]
    assert split.map_index.tolist() == [0, 0]


def test_peak_distance_is_validated_and_optional_in_files():
    with pytest.raises(ValueError, match="peak_distance"):
        Rule(0.1, 0.0, 0.5, 1.5)
    assert Rule.from_json({"min_rel_area": 0.2, "min_peak": 0.5, "nms_iou": 0.3}).peak_distance == 0.0
    rule = Rule(0.2, 0.5, 0.3, 0.1)
    assert Rule.from_json(rule.to_json()) == rule
