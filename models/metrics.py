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

IOU_LEVELS = (0.3, 0.5, 0.7)


def best_iou(pred: np.ndarray, truths: Sequence[np.ndarray]) -> np.ndarray:
    """For each predicted box i (n, 4), its IoU with the best-matching box of truths[i] (each (m_i, 4))."""
    pred = np.asarray(pred, np.float32).reshape(-1, 4)
    flat = [np.asarray(t, np.float32).reshape(-1, 4) for t in truths]
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(flat)] + [np.zeros(0, int)])
    if not len(owner):
        return np.zeros(len(pred), np.float32)
    iou = boxlib.box_iou(pred, np.concatenate(flat))
    iou = np.where(owner[None, :] == np.arange(len(pred))[:, None], iou, 0.0)
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


def sweep_thresholds(
    normed: np.ndarray,
    truths: Sequence[np.ndarray],
    *,
    valid: np.ndarray | None = None,
    taus: np.ndarray | None = None,
    levels: tuple[float, ...] = IOU_LEVELS,
) -> Sweep:
    """Box accuracy of the largest-component box at every threshold.

    Args:
      normed: float (N, H, W) normalised CAMs of the true class, in [0, 1].
      truths: N arrays (m_i, 4) of true boxes in the maps' pixel coordinates.
      taus: thresholds to try; default 0.00, 0.01, ..., 0.99 (wsolevaluation's step).
    """
    normed = np.asarray(normed, np.float32)
    n = len(normed)
    if n != len(truths):
        raise ValueError(f"expected one truth list per map, got {n} maps and {len(truths)} truths")
    taus = np.round(np.arange(0.0, 1.0, 0.01), 2) if taus is None else np.asarray(taus, np.float32)
    acc = np.zeros((len(taus), len(levels)), np.float64)
    for ti, tau in enumerate(taus):
        found = boxlib.boxes_from_cams(normed, float(tau), valid=valid)
        ious = np.zeros(n, np.float32)
        ious[found.map_index] = best_iou(found.xyxy, [truths[i] for i in found.map_index])
        acc[ti] = [(ious >= lv).mean() if n else 0.0 for lv in levels]
    return Sweep(taus=taus, levels=tuple(levels), accuracy=acc)
