"""Box refinement calibrated on a few boxed images: how a CAM falls off tells how big the object is.

A thresholded CAM gives boxes whose size is squeezed towards the size of the network's receptive field: on
cluttered MNIST, digits under 15 px get boxes 1.7x too large and digits over 25 px boxes 0.7x too small, while
their centres are almost always right (BENCHMARKS.md). The profile of the map around the object carries the
missing information: the boxes of the same object at several thresholds (0.2, 0.3, ... 0.8) shrink at a rate
that depends on the object's true extent. "The same object": below the base threshold, the component that
contains the base component; above it, the largest piece of the base component that survives. A ridge regression from that profile to the true box, fitted on the
same boxed calibration images that choose the threshold, corrects the box's centre and size.

Features of a map whose box at its threshold is b (centre cx, cy; size w, h; map size W x H):
  log(w / W), log(h / H), and for each profile threshold t with the same object's box b_t:
  log(w_t / w), log(h_t / h), (cx_t - cx) / w, (cy_t - cy) / h.
Targets, from the true box g: (gx - cx) / w, (gy - cy) / h, log(gw / w), log(gh / h).
The features are standardised; the intercept is not penalised; the penalty is chosen by k-fold cross-validation
on the calibration images for the mean box accuracy over IoU 0.3/0.5/0.7 (the MaxBoxAccV2 criterion).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import boxes as boxlib

PROFILE_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ALPHAS = (10.0, 30.0, 100.0, 300.0, 1000.0)
LEVELS = (0.3, 0.5, 0.7)
MIN_PAIRS = 20  # fewer boxed maps than this cannot fit 4 x 31 coefficients with any confidence
MAX_COEF = 1e4  # a fitted coefficient is far below this; a file above it is not one calibrate wrote


class RefineError(ValueError):
    """A refiner that cannot be fitted or read."""


def _cwh(xyxy: np.ndarray) -> np.ndarray:
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    return np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                     np.maximum(xyxy[:, 2] - xyxy[:, 0], 1e-3), np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-3)], 1)


def base_components(normed: np.ndarray, taus: np.ndarray, valid: np.ndarray | None = None):
    """The largest component of each map at its own threshold: (bool masks (N, H, W), boxes (N, 4), has (N,)).

    The same component `boxes.boxes_from_cams` boxes in mode "largest" (the same tie rule, `Components.ranked`).
    """
    comps = boxlib.threshold_components(np.asarray(normed, np.float32), taus, valid)
    which = comps.largest()
    xyxy, has = _boxes_of(comps, which)
    return (comps.labels == which[:, None, None]) & has[:, None, None], xyxy, has


def _boxes_of(comps: boxlib.Components, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) of one chosen label per map (0 = none; those rows stay zero) and which maps have one."""
    has = which > 0
    out = np.zeros((len(which), 4), np.float64)
    out[has] = comps.boxes(which[has])
    return out, has


def profile_features(normed: np.ndarray, taus: np.ndarray, valid: np.ndarray | None = None,
                     profile: Sequence[float] = PROFILE_TAUS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of N normalised maps (N, H, W) boxed at their thresholds `taus` (N,).

    The profile follows the object the base box holds: at a lower threshold, the component that contains the
    base component; at a higher one, the largest component inside it. Where the higher threshold leaves nothing
    of it, the base box stands in.

    Returns (base boxes (N, 4), has a base component (N,), float64 features (N, 2 + 4 * len(profile))).
    """
    normed = np.asarray(normed, np.float32)
    n, h, w = normed.shape
    taus = np.broadcast_to(np.asarray(taus, np.float32), (n,))
    base_mask, base_xyxy, has = base_components(normed, taus, valid)
    base = _cwh(np.where(has[:, None], base_xyxy, [0, 0, w, h]))
    seed = np.argmax(base_mask.reshape(n, -1), axis=1)  # any pixel of the base component
    seed_y, seed_x = np.divmod(seed, w)
    cols = [np.log(base[:, 2:] / np.array([w, h], np.float64))]
    for t in profile:
        lower = taus >= t
        at = base.copy()
        # Lower thresholds: the (unique) component around the base one, found from one of its pixels.
        comps = boxlib.threshold_components(normed, t, has)
        xyxy, got = _boxes_of(comps, np.where(lower & has, comps.labels[np.arange(n), seed_y, seed_x], 0))
        at[got] = _cwh(xyxy[got])
        # Higher thresholds: the largest piece of the base component that survives.
        comps = boxlib.components((normed >= t) & base_mask & ~lower[:, None, None])
        xyxy, got = _boxes_of(comps, comps.largest())
        at[got] = _cwh(xyxy[got])
        cols.append(np.log(at[:, 2:] / base[:, 2:]))
        cols.append((at[:, :2] - base[:, :2]) / base[:, 2:])
    return base_xyxy.astype(np.float32), has, np.concatenate(cols, axis=1)


def _targets(base_xyxy: np.ndarray, true_xyxy: np.ndarray) -> np.ndarray:
    b, g = _cwh(base_xyxy), _cwh(true_xyxy)
    return np.concatenate([(g[:, :2] - b[:, :2]) / b[:, 2:], np.log(g[:, 2:] / b[:, 2:])], axis=1)


def _decode(base_xyxy: np.ndarray, pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Predicted (offset, log size ratio) -> boxes inside the map, at least one pixel wide and high."""
    h, w = size
    b = _cwh(base_xyxy)
    centre = np.clip(b[:, :2] + pred[:, :2] * b[:, 2:], 0.5, [w - 0.5, h - 0.5])
    half = np.maximum(b[:, 2:] * np.exp(np.clip(pred[:, 2:], -3.0, 3.0)) / 2, 0.5)
    lo = np.clip(centre - half, 0, [w - 1, h - 1])
    hi = np.clip(centre + half, lo + 1, [w, h])
    return np.concatenate([lo, hi], axis=1).astype(np.float32)


def _solve(x: np.ndarray, y: np.ndarray, alpha: float):
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    a = np.c_[(x - mean) / scale, np.ones(len(x))]
    penalty = alpha * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is free
    coef = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    return mean, scale, coef


@dataclasses.dataclass(frozen=True, eq=False)
class BoxRefiner:
    """A fitted refinement: apply it to the largest-component boxes found at the calibrated thresholds."""

    taus: tuple[float, ...]
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (F + 1, 4), last row the intercept
    alpha: float

    def __post_init__(self):
        f = 2 + 4 * len(self.taus)
        if self.mean.shape != (f,) or self.scale.shape != (f,) or self.coef.shape != (f + 1, 4):
            raise RefineError(f"box_refine: expected {f} features and ({f + 1}, 4) coefficients, got mean "
                              f"{self.mean.shape}, scale {self.scale.shape}, coef {self.coef.shape}")
        if not all(np.isfinite(a).all() for a in (self.mean, self.scale, self.coef)) or (self.scale <= 0).any():
            raise RefineError("box_refine: coefficients must be finite and scales positive")
        if np.abs(self.coef).max() > MAX_COEF or not all(0.0 <= t <= 1.0 for t in self.taus):
            raise RefineError(f"box_refine: coefficients must be within +-{MAX_COEF:g} and thresholds within [0, 1]")

    def apply(self, normed: np.ndarray, taus, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Refined boxes of N normalised maps (N, H, W) at their base thresholds `taus` (scalar or (N,)).

        Returns (float32 (N, 4) x0y0x1y1 in the maps' pixels, inside the map and at least 1 px wide and high;
        bool (N,) which maps had a component to refine: the others' rows are zeros).
        """
        normed = np.asarray(normed, np.float32)
        if not len(normed):
            return np.zeros((0, 4), np.float32), np.zeros(0, bool)
        base, has, x = profile_features(normed, taus, valid, self.taus)
        pred = np.c_[(x - self.mean) / self.scale, np.ones(len(x))] @ self.coef
        return np.where(has[:, None], _decode(base, pred, normed.shape[1:]), 0).astype(np.float32), has

    def to_json(self) -> dict:
        return {"taus": list(self.taus), "alpha": self.alpha, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist()}

    @classmethod
    def from_json(cls, doc) -> "BoxRefiner":
        if not isinstance(doc, dict):
            raise RefineError(f"box_refine: expected an object, got {type(doc).__name__}")
        try:
            taus = tuple(float(t) for t in doc["taus"])
            return cls(taus=taus, mean=np.asarray(doc["mean"], np.float64), scale=np.asarray(doc["scale"], np.float64),
                       coef=np.asarray(doc["coef"], np.float64), alpha=float(doc.get("alpha", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RefineError):
                raise
            raise RefineError(f"box_refine: malformed ({exc})") from exc


def _accuracy(pred: np.ndarray, truths: Sequence[np.ndarray], levels=LEVELS) -> np.ndarray:
    """Box accuracy per level (len(levels),) of boxes (n, 4) of the n maps of `truths`; for a stack of sets of
    boxes (s, n, 4), one row (s, len(levels)) per set."""
    from .metrics import best_iou

    pred = np.asarray(pred, np.float32)
    sets = pred.reshape(-1, len(truths), 4)
    iou = best_iou(sets.reshape(-1, 4), truths, owner=np.tile(np.arange(len(truths)), len(sets)))
    iou = iou.reshape(len(sets), len(truths))
    acc = np.stack([(iou >= lv).mean(axis=1) for lv in levels], axis=1)
    return acc if pred.ndim == 3 else acc[0]


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Cross-validated box accuracy at IoU 0.3/0.5/0.7 before and after refinement, per penalty tried."""

    pairs: int
    folds: int
    base: np.ndarray  # (3,)
    refined: dict  # alpha -> (3,)
    chosen_alpha: float

    @property
    def gain(self) -> float:
        """Mean accuracy gained by the chosen refiner, in points (cross-validated)."""
        return float((self.refined[self.chosen_alpha].mean() - self.base.mean()) * 100)

    @property
    def helps(self) -> bool:
        """Whether to use the refiner at all: only where cross-validation saw it gain (calibrate's rule)."""
        return self.gain > 0


def fit(normed: np.ndarray, taus, truths: Sequence[np.ndarray], *, valid: np.ndarray | None = None,
        profile: Sequence[float] = PROFILE_TAUS, alphas: Sequence[float] = ALPHAS, folds: int = 5
        ) -> tuple[BoxRefiner, FitReport]:
    """Fit a refiner on boxed maps: normed (N, H, W), their base thresholds (scalar or (N,)) and true boxes (N
    arrays (m, 4)). Maps with no component at their threshold (nothing to refine) are left out.

    Each map's target is the true box that best overlaps its base box. The penalty is chosen by `folds`-fold
    cross-validation (map i in fold i % folds) for the mean accuracy over IoU 0.3/0.5/0.7; the refiner returned
    is refitted on all maps with it.
    """
    normed = np.asarray(normed, np.float32)
    if len(normed) != len(truths):
        raise RefineError(f"expected one truth list per map, got {len(normed)} maps and {len(truths)} truths")
    base_xyxy, has, x = profile_features(normed, taus, valid, profile)
    base_xyxy, x, truths = base_xyxy[has], x[has], [t for t, h in zip(truths, has) if h]
    n = len(x)
    if n < MIN_PAIRS:
        raise RefineError(f"box refinement needs at least {MIN_PAIRS} boxed maps to fit on, got {n}")
    flat = [np.asarray(t, np.float32).reshape(-1, 4) for t in truths]
    for i, t in enumerate(flat):
        if not len(t):
            raise RefineError(f"map {i} has no true box")
    # One IoU call for every map against every true box; each map keeps its own best-overlapping one.
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(flat)])
    iou = np.where(owner[None, :] == np.arange(n)[:, None], boxlib.box_iou(base_xyxy, np.concatenate(flat)), -1.0)
    target_boxes = np.concatenate(flat)[np.argmax(iou, axis=1)]
    y = _targets(base_xyxy, target_boxes)
    folds = max(2, min(folds, n))
    fold = np.arange(n) % folds
    size = normed.shape[1:]
    preds = np.empty((len(alphas), n, 4), np.float32)
    for a, alpha in enumerate(alphas):
        for k in range(folds):
            test = fold == k
            mean, scale, coef = _solve(x[~test], y[~test], alpha)
            out = np.c_[(x[test] - mean) / scale, np.ones(test.sum())] @ coef
            preds[a, test] = _decode(base_xyxy[test], out, size)
    # Every penalty's boxes and the base boxes scored in one IoU call.
    acc = _accuracy(np.concatenate([base_xyxy[None], preds]), truths)
    refined = {float(alpha): acc[a + 1] for a, alpha in enumerate(alphas)}
    chosen = max(refined, key=lambda a: (refined[a].mean(), a))  # ties: the stronger penalty
    mean, scale, coef = _solve(x, y, chosen)
    report = FitReport(pairs=n, folds=folds, base=acc[0], refined=refined, chosen_alpha=chosen)
    return BoxRefiner(tuple(float(t) for t in profile), mean, scale, coef, chosen), report
