"""Boxes judged as a detector's: COCO AP against hand-computed values, instance recall, baselines, and the
instance-rule calibration on hand-drawn maps."""
import json

import numpy as np
import pytest

from weakloc.models import boxes, detection


def _row(boxes_, truths, w=100, h=100, top1=0):
    box = lambda c, b, s: dict(class_id=c, label=str(c), score=s, cam_score=0.5, xmin=b[0], ymin=b[1], xmax=b[2],
                               ymax=b[3])
    gt = lambda c, b: dict(class_id=c, label=str(c), xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])
    return {"image_id": "x", "source": "x", "classes": [dict(class_id=top1, label=str(top1), score=0.9)],
            "width": w, "height": h, "boxes": [box(*b) for b in boxes_], "gt_boxes": [gt(*t) for t in truths]}


# Two true instances in one image and three scored predictions: 0.9 on truth A exactly, 0.8 on nothing,
# 0.7 on truth B exactly. IoUs are 1 or 0, so every COCO IoU level (0.50..0.95) sees the same ranking:
# TP (P 1, R 1/2), FP (P 1/2, R 1/2), TP (P 2/3, R 1). The interpolated precision is 1 at recall <= 0.5 (51 of
# COCO's 101 recall points) and 2/3 above (50 points): AP = (51 + 50 * 2/3) / 101 at every level.
HAND_AP = (51 + 50 * 2 / 3) / 101
TWO_TRUTHS = [(0, [10, 10, 30, 30]), (0, [60, 60, 90, 90])]
THREE_PREDICTIONS = [(0, [10, 10, 30, 30], 0.9), (0, [40, 0, 50, 20], 0.8), (0, [60, 60, 90, 90], 0.7)]


def test_coco_ap_matches_the_hand_computed_case():
    det = detection.detection_scores([_row(THREE_PREDICTIONS, TWO_TRUTHS)])
    assert det["ap"] == pytest.approx(HAND_AP) and det["ap50"] == pytest.approx(HAND_AP)
    assert det["ar100"] == pytest.approx(1.0)
    assert det["instance_recall"] == 1.0 and det["instances"] == 2 and det["predicted_boxes"] == 3
    # Scores decide AP: with the false positive ranked last, precision is 1 up to recall 1.
    reranked = [(c, b, s) for (c, b, _), s in zip(THREE_PREDICTIONS, (0.9, 0.1, 0.7))]
    assert detection.detection_scores([_row(reranked, TWO_TRUTHS)])["ap"] == pytest.approx(1.0)


def test_instance_recall_is_one_to_one_and_per_class():
    # One box on top of two overlapping truths can find only one of them; a box of another class finds none.
    truths = [(0, [0, 0, 20, 20]), (0, [0, 0, 20, 18]), (1, [50, 50, 70, 70])]
    det = detection.detection_scores([_row([(0, [0, 0, 20, 20], 0.9), (0, [80, 80, 90, 90], 0.5),
                                            (0, [50, 50, 70, 70], 0.5)], truths)])
    assert det["instance_recall"] == pytest.approx(1 / 3)
    assert det["instances"] == 3


def test_rows_without_ground_truth_are_left_out_and_none_at_all_refused():
    with_gt = _row(THREE_PREDICTIONS, TWO_TRUTHS)
    assert detection.detection_scores([with_gt, _row(THREE_PREDICTIONS, [])])["ap"] == pytest.approx(HAND_AP)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        detection.detection_scores([_row(THREE_PREDICTIONS, [])])
    no_boxes = detection.detection_scores([_row([], TWO_TRUTHS)])
    assert no_boxes["ap"] == 0.0 and no_boxes["instance_recall"] == 0.0


def test_baseline_rows_box_each_true_class_once():
    # A 200x100 image with one 20x20 and one 40x40 truth of class 0, and a 10x10 truth of class 1.
    truths = [(0, [0, 0, 20, 20]), (0, [100, 50, 140, 90]), (1, [0, 0, 10, 10])]
    full = detection.baseline_rows([_row([], truths, w=200, h=100)], "full_image")
    assert [(b["class_id"], [b["xmin"], b["ymin"], b["xmax"], b["ymax"]]) for b in full[0]["boxes"]] == [
        (0, [0, 0, 200, 100]), (1, [0, 0, 200, 100])]
    # Median relative size of the three truths: widths 0.1, 0.2, 0.05 -> 0.1; heights 0.2, 0.4, 0.1 -> 0.2.
    centred = detection.baseline_rows([_row([], truths, w=200, h=100)], "centred_median")
    assert [centred[0]["boxes"][0][k] for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx([90, 40, 110, 60])


def _scene(n, seed):
    """Maps of 2 well-separated blobs each (peaks 1.0 and 0.75 on a 0.1 floor) and a faint third speck (0.3),
    the truths the two blobs: the right rule keeps two boxes a map, drops the speck, and splits nothing."""
    rng = np.random.default_rng(seed)
    maps, truths = np.full((n, 24, 24), 0.1, np.float32), []
    for i in range(n):
        y0, x0 = rng.integers(0, 4, 2)
        y1, x1 = rng.integers(13, 17, 2)
        maps[i, y0 : y0 + 6, x0 : x0 + 6] = 1.0
        maps[i, y1 : y1 + 7, x1 : x1 + 5] = 0.75
        maps[i, 22, 1] = 0.3
        truths.append(np.array([[x0, y0, x0 + 6, y0 + 6], [x1, y1, x1 + 5, y1 + 7]], np.float32))
    return maps, truths


def test_calibration_chooses_a_rule_that_finds_both_instances():
    maps, truths = _scene(6, 0)
    normed, valid = boxes.normalize_cams(maps)
    cal = detection.calibrate_instances(normed, truths, [0] * 6, valid=valid, min_per_class=10)
    rule, tau = cal.instances, cal.overall.best_threshold
    # Normalised: floor 0, blobs 1 and 0.72, speck 0.22. Either tau in (0.22, 0.72], or a lower tau with a rule
    # whose peak bar drops the speck; either way, two boxes a map exactly on the truths.
    assert tau <= 0.72 and (tau > 0.22 or rule.min_peak > 0.22)
    assert cal.overall.accuracy[cal.overall.best_index].tolist() == [1.0, 1.0, 1.0]
    found = boxes.boxes_from_cams(normed, tau, valid=valid, mode="instances", instances=rule)
    assert sorted(map(tuple, found.xyxy.tolist())) == sorted(tuple(t) for ts in truths for t in ts.tolist())
    doc = cal.thresholds(["thing"]).to_json()
    assert boxes.InstanceRule.from_json(json.loads(json.dumps(doc))["instances"]) == rule
    # A threshold below the speck gets a third box a map: F1 2*2/(3+2) = 0.8 at every level.
    f1, _ = detection.sweep_instances(normed, truths, valid=valid, taus=[0.1], rules=[boxes.InstanceRule(0, 0, 0.5)])
    assert f1[0, 0].tolist() == pytest.approx([0.8] * 3)
