"""Box accuracy and threshold calibration, as clovaai/wsolevaluation defines them.

A predicted box is correct at IoU level delta when its IoU with some true box of the same image is >= delta.
MaxBoxAccV2 (Choe et al., CVPR 2020) = mean over delta in {0.3, 0.5, 0.7} of the best box accuracy over the
CAM threshold sweep, each delta taking its own best threshold; to *choose one* threshold for labeling we take the
one maximising the mean box accuracy over the three deltas.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import boxes as boxlib
from .thresholds import Thresholds

IOU_LEVELS = (0.3, 0.5, 0.7)


def best_iou(pred: np.ndarray, truths: Sequence[np.ndarray], owner: np.ndarray | None = None) -> np.ndarray:
    """For each predicted box i (n, 4), its IoU with the best-matching box of truths[owner[i]] (each (m_j, 4)).

    Without `owner`, box i is matched against truths[i]. With it, many boxes of the same maps (e.g. at every
    threshold of a sweep) are scored in one IoU call, which costs far less than one call each.
    """
    pred = np.asarray(pred, np.float32).reshape(-1, 4)
    owner = np.arange(len(pred)) if owner is None else np.asarray(owner, np.int64)
    flat = [np.asarray(t, np.float32).reshape(-1, 4) for t in truths]
    of = np.concatenate([np.full(len(t), i) for i, t in enumerate(flat)] + [np.zeros(0, int)])
    if not len(of) or not len(pred):
        return np.zeros(len(pred), np.float32)
    iou = boxlib.box_iou(pred, np.concatenate(flat))
    iou = np.where(of[None, :] == owner[:, None], iou, 0.0)
    return iou.max(axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """taus: (T,); accuracy: (T, len(levels)) share of maps whose box reaches each IoU level."""

    taus: np.ndarray
    levels: tuple[float, ...]
    accuracy: np.ndarray

    @property
    def best_index(self) -> int:
        """The threshold with the best mean accuracy over levels (first one on ties)."""
        return int(np.argmax(self.accuracy.mean(axis=1)))

    @property
    def best_threshold(self) -> float:
        return float(self.taus[self.best_index])

    @property
    def max_box_acc_v2(self) -> float:
        """MaxBoxAccV2 in percent: each level at its own best threshold, then averaged."""
        return float(self.accuracy.max(axis=0).mean() * 100.0)


DEFAULT_TAUS = np.round(np.arange(0.0, 1.0, 0.01), 2)  # wsolevaluation's step


def iou_table(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    *,
    valid: np.ndarray | None = None,
    taus: np.ndarray | None = None,
    mode: str = "largest",
    min_area: float = 0.0,
) -> np.ndarray:
    """float32 (T, N): at each threshold, each map's best IoU between its boxes and its true boxes (0 for a map
    with no box). Any subset of the maps is then swept by averaging its columns (`sweep_thresholds`, and the
    cross-validation of `choose.py`, which scores many subsets of the same maps).

    Args:
      normed: float (N, H, W) normalised CAMs of the true class, in [0, 1].
      truths: N arrays (m_i, 4) of true boxes in the maps' pixel coordinates.
      taus: thresholds to try; default DEFAULT_TAUS, 0.00, 0.01, ..., 0.99.
      mode, min_area: as boxes_from_cams; with mode "all" a map counts as right when any of its boxes is.
    """
    normed = np.asarray(normed, np.float32)
    n = len(normed)
    if n != len(truths):
        raise ValueError(f"expected one truth list per map, got {n} maps and {len(truths)} truths")
    taus = DEFAULT_TAUS if taus is None else np.asarray(taus, np.float32)
    table = np.zeros((len(taus), n), np.float32)
    xyxy, maps, at = [], [], []
    for ti, tau in enumerate(taus):
        found = boxlib.boxes_from_cams(normed, float(tau), valid=valid, mode=mode, min_area=min_area)
        xyxy.append(found.xyxy)
        maps.append(found.map_index)
        at.append(np.full(len(found.map_index), ti))
    maps, at = np.concatenate(maps), np.concatenate(at)
    np.maximum.at(table, (at, maps), best_iou(np.concatenate(xyxy), truths, owner=maps))
    return table


def sweep_thresholds(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    *,
    valid: np.ndarray | None = None,
    taus: np.ndarray | None = None,
    levels: tuple[float, ...] = IOU_LEVELS,
    mode: str = "largest",
    min_area: float = 0.0,
) -> Sweep:
    """Box accuracy of the largest-component box at every threshold (arguments as `iou_table`)."""
    taus = DEFAULT_TAUS if taus is None else np.asarray(taus, np.float32)
    table = iou_table(normed, truths, valid=valid, taus=taus, mode=mode, min_area=min_area)
    return sweep_of(table, taus, levels)


def sweep_of(table: np.ndarray, taus: np.ndarray, levels: tuple[float, ...] = IOU_LEVELS) -> Sweep:
    """The Sweep of an `iou_table` (T, N): the share of its maps reaching each IoU level at each threshold."""
    acc = np.stack([(table >= lv).mean(axis=1) if table.shape[1] else np.zeros(len(taus)) for lv in levels], axis=1)
    return Sweep(taus=np.asarray(taus), levels=tuple(levels), accuracy=acc.astype(np.float64))


def box_xyxy(d) -> list[float]:
    """[x0, y0, x1, y1] of a box row (xmin, ymin, xmax, ymax)."""
    return [d["xmin"], d["ymin"], d["xmax"], d["ymax"]]


def _truth_by_class(row: dict) -> dict[int, list]:
    out: dict[int, list] = {}
    for g in row.get("gt_boxes") or ():
        out.setdefault(int(g["class_id"]), []).append(box_xyxy(g))
    return out


def image_ious(row: dict) -> dict[int, float]:
    """{true class id: IoU of weakloc's best box of that class with its best true box (0 without such a box)} of
    one annotation row (schema.ANNOTATION_SCHEMA as a dict, `gt_boxes` filled)."""
    out = {}
    for cid, truths in _truth_by_class(row).items():
        mine = [box_xyxy(b) for b in row.get("boxes") or () if int(b["class_id"]) == cid]
        out[cid] = float(boxlib.box_iou(np.array(mine), np.array(truths)).max()) if mine else 0.0
    return out


def evaluate_rows(rows: Sequence[dict], class_names: Sequence[str], *, levels=IOU_LEVELS) -> dict:
    """Localization scores of annotation rows that carry `gt_boxes` (schema.ANNOTATION_SCHEMA as dicts).

    For every (image, true class) pair: the IoU of the best predicted box of that class with the best true box
    of that class (0 where weakloc gave no box for it). GT-known Loc counts IoU >= delta; Top-1 Loc also needs
    the top-1 prediction to be that class. Baselines on the same pairs: the full-image box, and a box of the
    median true (relative) size centred in the image.

    Returns:
      {"pairs", "images", "top1", "gt_known": {delta: share}, "top1_loc": {...}, "mean_iou",
       "per_class": {name: {"pairs", "corloc": {delta: share}, "mean_iou"}},
       "baselines": {"full_image": {...}, "centred_median": {...}}} with shares in [0, 1].
    """
    pairs = []  # (class id, iou, top1 correct, true boxes, width, height)
    images = top1_hits = 0
    for row in rows:
        truth_by_class = _truth_by_class(row)
        if not truth_by_class:
            continue
        images += 1
        top1 = row["classes"][0]["class_id"] if row.get("classes") else -1
        top1_hits += top1 in truth_by_class
        for cid, iou in image_ious(row).items():
            truths = truth_by_class[cid]
            pairs.append((cid, iou, top1 == cid, np.array(truths, np.float32), row["width"], row["height"]))
    if not pairs:
        raise ValueError("no annotation row carries ground-truth boxes: nothing to evaluate")

    ious = np.array([p[1] for p in pairs])
    top1_ok = np.array([p[2] for p in pairs])
    median = median_relative_size([p[3] for p in pairs], [(p[4], p[5]) for p in pairs])

    def baseline(kind):
        vals = np.array([boxlib.box_iou(baseline_box(kind, p[4], p[5], median)[None], p[3]).max() for p in pairs])
        return {"gt_known": {lv: float((vals >= lv).mean()) for lv in levels}, "mean_iou": float(vals.mean())}

    per_class = {}
    for cid in sorted({p[0] for p in pairs}):
        sel = np.array([p[0] == cid for p in pairs])
        name = class_names[cid] if 0 <= cid < len(class_names) else str(cid)
        per_class[name] = {
            "pairs": int(sel.sum()),
            "corloc": {lv: float((ious[sel] >= lv).mean()) for lv in levels},
            "mean_iou": float(ious[sel].mean()),
        }
    return {
        "pairs": len(pairs),
        "images": images,
        "top1": top1_hits / images,
        "gt_known": {lv: float((ious >= lv).mean()) for lv in levels},
        "top1_loc": {lv: float(((ious >= lv) & top1_ok).mean()) for lv in levels},
        "mean_iou": float(ious.mean()),
        "per_class": per_class,
        "baselines": {kind: baseline(kind) for kind in BASELINES},
    }


BASELINES = ("full_image", "centred_median")


def median_relative_size(truths: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Median (width, height) of true boxes (each array (m_i, 4) in pixels) relative to their image (w_i, h_i)."""
    rel = np.concatenate([(t[:, 2:] - t[:, :2]) / np.array(wh, np.float32) for t, wh in zip(truths, sizes)])
    med_w, med_h = np.median(rel, axis=0)
    return float(med_w), float(med_h)


def baseline_box(kind: str, w: float, h: float, median: tuple[float, float]) -> np.ndarray:
    """float32 (4,) a baseline's box in a w x h image: the whole image, or a box of the median true relative
    size centred in it."""
    if kind == "full_image":
        return np.array([0, 0, w, h], np.float32)
    mw, mh = median
    return np.array([w * (1 - mw) / 2, h * (1 - mh) / 2, w * (1 + mw) / 2, h * (1 + mh) / 2], np.float32)


def shrunk_threshold(own: float, n: int, overall: float, shrink: float) -> float:
    """A class's threshold `own`, fitted on `n` maps, pulled towards the `overall` one as if `shrink` more maps had
    chosen that: (n own + shrink overall) / (n + shrink), to 0.01 (the sweep's step). shrink 0 keeps `own`; a
    class seen on few maps stays near the overall choice (a James-Stein-like pull, calibrate --shrink)."""
    if shrink < 0 or n < 0:
        raise ValueError(f"shrink and n must be >= 0, got shrink={shrink}, n={n}")
    if n + shrink == 0:
        return round(float(overall), 2)
    return round((n * float(own) + shrink * float(overall)) / (n + shrink), 2)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The threshold sweep over all maps, and per class where a class has at least `min_per_class` maps."""

    overall: Sweep
    per_class: dict[int, Sweep]
    counts: dict[int, int]
    instances: boxlib.InstanceRule | None = None  # chosen with the thresholds for --boxes instances

    def class_threshold(self, c: int, shrink: float = 0.0) -> float:
        """Class `c`'s threshold, `shrunk_threshold` of its own towards the overall one (the overall one for a
        class without its own sweep)."""
        t = self.overall.best_threshold
        if c not in self.per_class:
            return t
        return shrunk_threshold(self.per_class[c].best_threshold, self.counts[c], t, shrink)

    def thresholds(self, class_names: Sequence[str], *, shrink: float = 0.0) -> Thresholds:
        """The chosen thresholds, as the `--thresholds` document `weakloc label` reads (per class: shrunk)."""
        return Thresholds(
            default=self.overall.best_threshold,
            per_class={class_names[c]: self.class_threshold(c, shrink) for c in sorted(self.per_class)},
            instances=self.instances,
        )


def calibrate(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    class_ids: Sequence[int],
    *,
    valid: np.ndarray | None = None,
    min_per_class: int = 5,
    taus: np.ndarray | None = None,
    mode: str = "largest",
    min_area: float = 0.0,
) -> Calibration:
    """Sweep thresholds over all maps and separately over each class's maps.

    Args:
      normed: float (N, H, W) normalised CAMs, each of the class `class_ids[i]`, in [0, 1].
      truths: N arrays (m_i, 4) of that class's true boxes, in the maps' pixel coordinates.
      class_ids: int (N,) the class of each map.
      min_per_class: a class with fewer maps gets no threshold of its own (it uses the overall one): a
        threshold chosen on two or three maps fits their noise, not the class.
    """
    class_ids = np.asarray(class_ids, np.int64)
    valid = np.ones(len(normed), bool) if valid is None else np.asarray(valid, bool)
    kw = dict(taus=taus, mode=mode, min_area=min_area)
    overall = sweep_thresholds(normed, truths, valid=valid, **kw)
    per_class, counts = per_class_sweeps(
        class_ids, min_per_class,
        lambda sel: sweep_thresholds(normed[sel], [truths[i] for i in sel], valid=valid[sel], **kw))
    return Calibration(overall, per_class, counts)


def per_class_sweeps(class_ids: np.ndarray, min_per_class: int, sweep) -> tuple[dict[int, Sweep], dict[int, int]]:
    """({class: sweep(its map indices)} for each class with at least `min_per_class` maps, {class: map count})."""
    per_class, counts = {}, {}
    for c in np.unique(class_ids):
        sel = np.flatnonzero(class_ids == c)
        counts[int(c)] = len(sel)
        if len(sel) >= min_per_class:
            per_class[int(c)] = sweep(sel)
    return per_class, counts


def fit_box_stretch(
    xyxy: np.ndarray,
    truths: Sequence[np.ndarray],
    size: tuple[int, int],
    *,
    factors: np.ndarray | None = None,
    levels: tuple[float, ...] = IOU_LEVELS,
) -> tuple[tuple[float, float], float, float]:
    """The (width, height) stretch of boxes that maximises box accuracy averaged over `levels`.

    Args:
      xyxy: (N, 4) one box per map (the box at the chosen threshold), in map pixels.
      truths: N arrays (m_i, 4) of true boxes.
      size: (H, W) of the maps, for clipping.
      factors: candidate factors per axis; default 0.70, 0.75, ..., 1.50.

    Returns:
      ((fw, fh), mean accuracy with it, mean accuracy unstretched). Ties keep the factor closest to (1, 1).
    """
    factors = np.round(np.arange(0.70, 1.501, 0.05), 2) if factors is None else np.asarray(factors)
    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    n = len(xyxy)
    grid = [(1.0, 1.0)] + [(float(fw), float(fh)) for fw in factors for fh in factors]
    stretched = np.concatenate([boxlib.stretch_boxes(xyxy, f, size) for f in grid])
    ious = best_iou(stretched, truths, owner=np.tile(np.arange(n), len(grid))).reshape(len(grid), n)
    scores = np.mean([(ious >= lv).mean(axis=1) for lv in levels], axis=0) if n else np.zeros(len(grid))
    base = float(scores[0])
    best, best_f = base, (1.0, 1.0)
    for f, sc in zip(grid[1:], scores[1:].tolist()):
        closer = abs(f[0] - 1) + abs(f[1] - 1) < abs(best_f[0] - 1) + abs(best_f[1] - 1)
        if sc > best + 1e-12 or (abs(sc - best) <= 1e-12 and closer):
            best, best_f = sc, f
    return best_f, best, base
