"""Boxes judged as a detector's: one-to-one matching of instances, COCO AP through pycocotools, and the choice of
an `InstanceRule` on boxed images.

A true instance is found at IoU level delta when a predicted box of its class in its image is matched to it with
IoU >= delta, each box matching at most one instance (a maximum bipartite matching, scipy's assignment solver).
Boxes: x0y0x1y1, continuous pixels, max edge exclusive.
"""
from __future__ import annotations

import contextlib
import io
import itertools
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import boxes as boxlib
from . import metrics

# The rule grid calibrate searches (with tau): a relative area, a peak bar, an NMS IoU and a peak distance per axis
# (0: components whole; 0.1 and 0.15 of the map side: touching objects split at their separate peaks).
REL_AREAS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5)
PEAKS = (0.0, 0.5, 0.7, 0.85)
NMS_IOUS = (0.3, 0.5, 0.7)
PEAK_DISTANCES = (0.0, 0.1, 0.15)
INSTANCE_TAUS = tuple(np.round(np.arange(0.0, 1.0, 0.02), 2))


def matched(iou: np.ndarray, level: float) -> int:
    """How many pairs a one-to-one matching of predictions (rows) to truths (columns) can make with IoU >= level."""
    hit = np.asarray(iou) >= level
    if not hit.any():
        return 0
    if min(hit.shape) == 1:
        return 1
    r, c = linear_sum_assignment(hit, maximize=True)
    return int(hit[r, c].sum())


def _rule_grid() -> list[boxlib.InstanceRule]:
    # Peak distance outermost: ties keep the first rule, so a split is chosen only when it scores strictly better.
    return [boxlib.InstanceRule(a, p, u, d)
            for d, a, p, u in itertools.product(PEAK_DISTANCES, REL_AREAS, PEAKS, NMS_IOUS)]


def sweep_instances(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    *,
    valid: np.ndarray | None = None,
    taus: Sequence[float] = INSTANCE_TAUS,
    rules: Sequence[boxlib.InstanceRule] | None = None,
    levels: tuple[float, ...] = metrics.IOU_LEVELS,
) -> tuple[np.ndarray, list[boxlib.InstanceRule]]:
    """Instance F1 of every (threshold, rule): float (T, R, L), 2 TP / (predicted boxes + true instances).

    Args:
      normed: float (N, H, W) normalised CAMs of the true class, in [0, 1].
      truths: N arrays (m_i, 4) of that class's true boxes in the maps' pixel coordinates.

    F1 rewards finding every instance and punishes every extra box, so the rule that wins neither splits one
    object into pieces nor merges two. Components and their IoUs with the truths are computed once a threshold.
    """
    rules = _rule_grid() if rules is None else list(rules)
    flat = [np.asarray(t, np.float32).reshape(-1, 4) for t in truths]
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(flat)] + [np.zeros(0, np.int64)])
    every = np.concatenate(flat + [np.zeros((0, 4), np.float32)])
    out = np.zeros((len(taus), len(rules), len(levels)))
    distances = sorted({r.peak_distance for r in rules})
    for ti, tau in enumerate(taus):
        # Components (and their IoUs with the truths) once a threshold and peak distance.
        per_distance = {}
        for d in distances:
            cands = boxlib.candidates(normed, float(tau), valid, peak_distance=d)
            per_distance[d] = cands, boxlib.box_iou(cands.xyxy, every)  # each map then reads its own block
        for ri, rule in enumerate(rules):
            cands, iou = per_distance[rule.peak_distance]
            keep = cands.select(rule)
            tp = np.zeros(len(levels))
            for i in np.unique(cands.map_index[keep]).tolist():
                sub = iou[np.ix_(keep[cands.map_index[keep] == i], np.flatnonzero(owner == i))]
                tp += [matched(sub, lv) for lv in levels]
            out[ti, ri] = 2 * tp / max(len(keep) + len(every), 1)
    return out, rules


def calibrate_instances(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    class_ids: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    min_per_class: int = 5,
    taus: Sequence[float] = INSTANCE_TAUS,
    rules: Sequence[boxlib.InstanceRule] | None = None,
) -> metrics.Calibration:
    """Choose (tau, rule) together on all maps by mean instance F1 over the IoU levels, then a tau per class
    with that rule where a class has `min_per_class` maps. Ties keep the first: the lowest tau, then the rule
    earliest in the grid (the most permissive area and peak bars, the lowest NMS IoU).

    Returns a Calibration whose sweeps' "accuracy" is the instance F1 at the chosen rule.
    """
    class_ids = np.asarray(class_ids, np.int64)
    valid = np.ones(len(normed), bool) if valid is None else np.asarray(valid, bool)
    f1, rules = sweep_instances(normed, truths, valid=valid, taus=taus, rules=rules)
    mean = f1.mean(axis=2)
    ti, ri = np.unravel_index(int(np.argmax(mean)), mean.shape)
    rule = rules[ri]
    taus = np.asarray(taus, np.float64)  # as written to the file: 0.42, not float32's 0.41999998...
    overall = metrics.Sweep(taus=taus, levels=metrics.IOU_LEVELS, accuracy=f1[:, ri, :])

    def sweep(sel):
        f, _ = sweep_instances(normed[sel], [truths[i] for i in sel], valid=valid[sel], taus=taus, rules=[rule])
        return metrics.Sweep(taus=taus, levels=metrics.IOU_LEVELS, accuracy=f[:, 0, :])

    per_class, counts = metrics.per_class_sweeps(class_ids, min_per_class, sweep)
    return metrics.Calibration(overall, per_class, counts, instances=rule)


def _truths_and_predictions(rows):
    """Per row with ground truth: ({class: true boxes (m, 4)}, {class: (boxes (n, 4), scores (n,))})."""
    for row in rows:
        truth: dict[int, list] = {}
        for g in row.get("gt_boxes") or ():
            truth.setdefault(int(g["class_id"]), []).append(metrics.box_xyxy(g))
        if not truth:
            continue
        pred: dict[int, list] = {}
        for b in row.get("boxes") or ():
            pred.setdefault(int(b["class_id"]), []).append((metrics.box_xyxy(b), float(b["score"])))
        yield row, {c: np.array(t, np.float32) for c, t in truth.items()}, pred


def detection_scores(rows: Sequence[dict], *, level: float = 0.5) -> dict:
    """COCO AP, AP50, AR@100 (pycocotools COCOeval over every predicted box, ranked by its score, against every
    true instance) and instance recall at `level` (share of true instances a one-to-one matching finds, whatever
    the scores) of annotation rows that carry gt_boxes. Rows without ground truth are left out.

    Returns {"ap", "ap50", "ar100", "instance_recall", "instances", "predicted_boxes"} (shares in [0, 1]; AP -1
    where COCOeval has nothing to average).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gts, dts, cats = [], [], [], set()
    found = n_true = 0
    for i, (row, truth, pred) in enumerate(_truths_and_predictions(rows), start=1):
        images.append({"id": i, "width": int(row["width"]), "height": int(row["height"])})
        for c, t in truth.items():
            cats.add(c)
            n_true += len(t)
            for x0, y0, x1, y1 in t.tolist():
                gts.append({"id": len(gts) + 1, "image_id": i, "category_id": c, "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
            if c in pred:
                found += matched(boxlib.box_iou(np.array([b for b, _ in pred[c]]), t), level)
        for c, ps in pred.items():
            for (x0, y0, x1, y1), s in ps:
                dts.append({"id": len(dts) + 1, "image_id": i, "category_id": c, "score": s,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    if not images:
        raise ValueError("no annotation row carries ground-truth boxes: nothing to evaluate")
    ap = ap50 = ar100 = 0.0
    if dts:
        # pycocotools reports progress on stdout; library code stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c} for c in sorted(cats)]}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dts), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        ap, ap50, ar100 = (float(ev.stats[j]) for j in (0, 1, 8))
    return {"ap": ap, "ap50": ap50, "ar100": ar100, "instance_recall": found / n_true, "instances": n_true,
            "predicted_boxes": len(dts)}


def baseline_rows(rows: Sequence[dict], kind: str) -> list[dict]:
    """The rows with ground truth, each given one `metrics.baseline_box` of kind per true class, score 1: the
    baselines as detectors that know the image's classes (as GT-known Loc does)."""
    kept = list(_truths_and_predictions(rows))
    if not kept:
        raise ValueError("no annotation row carries ground-truth boxes: nothing to evaluate")
    median = metrics.median_relative_size([t for _, truth, _ in kept for t in truth.values()],
                                          [(r["width"], r["height"]) for r, truth, _ in kept for _ in truth])
    out = []
    for row, truth, _ in kept:
        boxes = []
        for c in truth:
            x0, y0, x1, y1 = metrics.baseline_box(kind, row["width"], row["height"], median).tolist()
            boxes.append({"class_id": c, "score": 1.0, "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1})
        out.append(dict(row, boxes=boxes))
    return out
