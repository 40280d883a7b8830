"""Choosing how CAMs become boxes, by cross-validation on a few boxed images (issue 17, `weakloc calibrate`).

Every way of turning maps into boxes is a `Candidate` in one table, `CANDIDATES`: which maps (plain or contrast
CAMs, with or without flip averaging), which box rule, which correction after it (none, a stretch, the box
refinement of `refine.py`) and whether classes get thresholds of their own. Each candidate is fitted on k - 1
folds of the boxed maps and scored on the fold it did not see; the criterion is the mean box accuracy over IoU
0.3/0.5/0.7 at the fitted operating point (the operating-point form of MaxBoxAccV2, as `metrics.Sweep.best_index`
chooses a threshold). The winner is refitted on every map and is what `label` applies. A later method (another
map kind, another box rule) is one more row of the table and one more branch of `Fitted.boxes`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import boxes as boxlib
from . import defaults, metrics, refine, regressor
from .annotate import regressed
from .thresholds import COLOC_MAPS, Method, Thresholds

FOLDS = 5
# Base thresholds the refinement may start from besides the calibrated one: a low base keeps more of the map's
# falloff in the profile (BENCHMARKS.md: the best base for refined boxes is far below the best one for plain boxes).
REFINE_BASES = (0.2, 0.3, 0.4, 0.5)


POSTS = ("none", "stretch", "refine", "regress")


@dataclasses.dataclass(frozen=True)
class MapKind:
    """Which forward pass the maps come from (`cam.CamModel`'s `contrast` and `flip_tta`), whether they are
    co-localization maps (`coloc`: thresholds.COLOC_MAPS; "none" = CAMs) and of which layer's features
    (`coloc_layer`: a layer name or "auto", as `label --coloc_layer`; None: the GAP head's)."""

    contrast: bool = False
    flip_tta: bool = False
    coloc: str = "none"
    coloc_layer: str | None = None

    def __post_init__(self):
        if self.coloc not in COLOC_MAPS:
            raise ValueError(f"map kind: coloc must be one of {COLOC_MAPS}, got {self.coloc!r}")
        if self.coloc != "none" and self.contrast:
            raise ValueError("co-localization maps do not use contrast CAM weights")
        if self.coloc_layer and self.coloc == "none":
            raise ValueError("coloc_layer names the features of co-localization maps")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way from maps to boxes.

    boxes: the box rule of `boxes.boxes_from_cams` ("largest" or "union", with `min_area` of the map);
    post: "none", "stretch" (a width/height factor fitted by `metrics.fit_box_stretch`), "refine"
      (`refine.fit`, from a base threshold chosen with it) or "regress" (the self-trained box regressor of
      `regressor.py`, fitted on the confident pseudo-boxes of a `RegressPool` at the fitted threshold);
    per_class: classes with enough boxed maps get their own threshold (else one threshold for all);
    blend: post "regress" only, the weight of the regressed box against the map's own (1: the regressed box).
    """

    name: str
    maps: MapKind = MapKind()
    boxes: str = "largest"
    post: str = "none"
    per_class: bool = True
    blend: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.blend <= 1.0:
            raise ValueError(f"candidate {self.name}: blend must be within (0, 1], got {self.blend!r}")
        if self.boxes not in ("largest", "union"):
            raise ValueError(f"candidate {self.name}: boxes must be 'largest' or 'union', got {self.boxes!r}")
        if self.post not in POSTS:
            raise ValueError(f"candidate {self.name}: post must be one of {POSTS}, got {self.post!r}")
        if self.post == "regress" and self.maps.coloc != "none":
            raise ValueError(f"candidate {self.name}: the box regressor corrects CAM boxes only")
        if self.post != "none" and self.boxes != "largest":
            raise ValueError(f"candidate {self.name}: a {self.post} corrects largest-component boxes only")


PLAIN, CONTRAST, FLIP, CONTRAST_FLIP = MapKind(), MapKind(contrast=True), MapKind(flip_tta=True), MapKind(True, True)
# Co-localization (DDT, models/coloc.py; issue 17): calibrate pools the statistics of its own boxed images'
# features per class, writes them beside the thresholds file, and label reuses them (one pass, the same maps).
COLOC, FUSED_MEAN, FUSED_PRODUCT = MapKind(coloc="coloc"), MapKind(coloc="mean"), MapKind(coloc="product")
# The same on the residual stream at twice the head's resolution (graph.finer_layer: MobileNetV2's 14 x 14
# block_12_add), which boxes real photos far better than the head's own 7 x 7 map (BENCHMARKS.md).
COLOC_FINE = MapKind(coloc="coloc", coloc_layer="auto")
FUSED_FINE_MEAN, FUSED_FINE_PRODUCT = MapKind(coloc="mean", coloc_layer="auto"), MapKind(coloc="product",
                                                                                      coloc_layer="auto")

# The one table of what calibrate tries. Order matters only on ties: the earlier (simpler) candidate wins.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("cam"),
    Candidate("cam_global", per_class=False),
    Candidate("contrast", CONTRAST),
    Candidate("contrast_global", CONTRAST, per_class=False),
    Candidate("flip", FLIP),
    Candidate("contrast_flip", CONTRAST_FLIP),
    Candidate("cam_union", boxes="union"),
    Candidate("cam_stretch", post="stretch", per_class=False),
    Candidate("cam_refine", post="refine", per_class=False),
    Candidate("contrast_refine", CONTRAST, post="refine", per_class=False),
    Candidate("flip_refine", FLIP, post="refine", per_class=False),
    Candidate("contrast_flip_refine", CONTRAST_FLIP, post="refine", per_class=False),
)
# Issue 17's co-localization rows, kept together (they need the GAP head's feature maps: not with Grad-CAM).
COLOC_CANDIDATES = (
    Candidate("coloc", COLOC),
    Candidate("coloc_global", COLOC, per_class=False),
    Candidate("fused_mean", FUSED_MEAN),
    Candidate("fused_product", FUSED_PRODUCT),
    Candidate("coloc_refine", COLOC, post="refine", per_class=False),
    Candidate("coloc_fine", COLOC_FINE),
    Candidate("coloc_fine_global", COLOC_FINE, per_class=False),
    Candidate("fused_fine_mean", FUSED_FINE_MEAN),
    Candidate("fused_fine_product", FUSED_FINE_PRODUCT),
    Candidate("coloc_fine_refine", COLOC_FINE, post="refine", per_class=False),
)
# Issue 17's self-trained box regressor (PSOL-like, models/regressor.py): the calibrated CAM boxes of the
# confident images teach a ridge regression from pooled features to boxes; label applies it in its one pass.
REGRESS_CANDIDATES = (
    Candidate("regress", post="regress", per_class=False),
    Candidate("cam+regress", post="regress", per_class=False, blend=0.5),
)
CANDIDATES = CANDIDATES + COLOC_CANDIDATES + REGRESS_CANDIDATES
DEFAULT = CANDIDATES[0]  # plain CAM: what label does when nothing was calibrated


def candidate(name: str) -> Candidate:
    for c in CANDIDATES:
        if c.name == name:
            return c
    raise KeyError(f"no candidate {name!r}; candidates: {[c.name for c in CANDIDATES]}")


@dataclasses.dataclass(frozen=True, eq=False)
class Maps:
    """Boxed maps of one kind: normed float32 (N, H, W) in [0, 1], valid bool (N,), truths N arrays (m, 4) in the
    maps' pixels (x0y0x1y1, max edge exclusive), class ids int (N,)."""

    normed: np.ndarray
    valid: np.ndarray
    truths: list
    classes: np.ndarray
    desc: np.ndarray | None = None  # float32 (N, D) `regressor.descriptors` of each map's image (regress rows)

    def take(self, idx: np.ndarray) -> "Maps":
        return Maps(self.normed[idx], self.valid[idx], [self.truths[i] for i in idx], self.classes[idx],
                    None if self.desc is None else self.desc[idx])


@dataclasses.dataclass(frozen=True, eq=False)
class RegressPool:
    """The images a box regressor self-trains on (no true box is read): the normed top-1 class map of each,
    float32 (P, H, W) in [0, 1], valid bool (P,), its class probability top_scores (P,), desc float32 (P, D) the
    `regressor.descriptors` of its features on `grid`; `quantile`: which pseudo-boxes count as confident."""

    normed: np.ndarray
    valid: np.ndarray
    top_scores: np.ndarray
    desc: np.ndarray
    grid: int = 1
    quantile: float = regressor.CONFIDENT_QUANTILE

    def fit(self, tau: float, min_area: float = defaults.MIN_BOX_AREA) -> regressor.BoxRegressor:
        """Pass 1 at threshold `tau`, the confident pseudo-boxes, the regression fitted on them.
        Raises CandidateError when too few are confident."""
        h, w = self.normed.shape[1:]
        found = boxlib.boxes_from_cams(self.normed, np.full(len(self.normed), tau, np.float32), valid=self.valid,
                                       mode="largest", min_area=min_area)
        has = np.zeros(len(self.normed), bool)
        has[found.map_index] = True
        xyxy = np.zeros((len(self.normed), 4), np.float32)
        xyxy[found.map_index] = found.xyxy / np.array([w, h, w, h], np.float32)
        box_score = np.zeros(len(self.normed), np.float32)
        box_score[found.map_index] = found.cam_score
        keep = regressor.confident(self.top_scores, box_score, has, self.quantile)
        try:
            return regressor.fit(self.desc[keep], xyxy[keep], grid=self.grid)
        except regressor.RegressorError as exc:
            raise CandidateError(str(exc)) from None


@dataclasses.dataclass(frozen=True, eq=False)
class Fitted:
    """A candidate fitted on boxed maps: its thresholds and correction, ready to box new maps as `label` does."""

    candidate: Candidate
    default: float
    per_class: dict  # class id -> tau (shrunk towards `default`, see `fit`)
    per_class_fitted: dict = dataclasses.field(default_factory=dict)  # class id -> (own tau before shrinking, maps)
    stretch: tuple[float, float] = (1.0, 1.0)
    refiner: refine.BoxRefiner | None = None
    min_area: float = defaults.MIN_BOX_AREA
    regressor: regressor.BoxRegressor | None = None

    def taus(self, classes: np.ndarray) -> np.ndarray:
        return np.array([self.per_class.get(int(c), self.default) for c in classes], np.float32)

    def boxes(self, normed: np.ndarray, valid: np.ndarray, classes: np.ndarray,
              desc: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One box per map, as `annotate.annotate_batch` makes it: (float32 (N, 4) in the maps' pixels, bool (N,)
        which maps got one; rows without a box are zeros). `desc`: the maps' images' descriptors (N, D), needed
        with a regressor (which replaces, or is blended into, the boxes of the maps that have one)."""
        n = len(normed)
        taus = self.taus(classes)
        if self.refiner is not None:
            return self.refiner.apply(normed, taus, valid)
        found = boxlib.boxes_from_cams(normed, taus, valid=valid, mode=self.candidate.boxes, min_area=self.min_area)
        xyxy = np.zeros((n, 4), np.float32)
        has = np.zeros(n, bool)
        xyxy[found.map_index] = found.xyxy
        has[found.map_index] = True
        if self.stretch != (1.0, 1.0):
            xyxy[has] = boxlib.stretch_boxes(xyxy[has], self.stretch, normed.shape[1:])
        if self.regressor is not None:
            if desc is None:
                raise ValueError("a box regressor needs the descriptors of the maps' images")
            h, w = normed.shape[1:]
            xyxy[has] = regressed(xyxy[has], self.regressor.predict(desc[has]), (h, w), self.candidate.blend)
        return xyxy, has

    def thresholds(self, class_names: Sequence[str], coloc_stats: str | None = None,
                   regressor_file: str | None = None, coloc_layer: str | None = None) -> Thresholds:
        """The thresholds document that makes `label` box as this candidate does (`coloc_stats`: where the
        statistics of a co-localization candidate's maps are, relative to the file; `coloc_layer`: the layer
        name its maps read, "auto" resolved; `regressor_file`: where a regress candidate's regressor is, likewise)."""
        return Thresholds(
            default=float(self.default),
            per_class={class_names[c]: float(t) for c, t in sorted(self.per_class.items())},
            cam_contrast=self.candidate.maps.contrast,
            box_stretch=None if self.stretch == (1.0, 1.0) else tuple(self.stretch),
            box_refine=self.refiner,
            method=Method(name=self.candidate.name, flip_tta=self.candidate.maps.flip_tta,
                          boxes=self.candidate.boxes, min_box_area=float(self.min_area),
                          coloc=self.candidate.maps.coloc,
                          coloc_stats=None if self.candidate.maps.coloc == "none" else coloc_stats,
                          coloc_layer=None if self.candidate.maps.coloc == "none" else coloc_layer,
                          regressor=regressor_file if self.regressor is not None else None,
                          regress_blend=self.candidate.blend if self.regressor is not None else 1.0),
        )


class CandidateError(ValueError):
    """A candidate that cannot be fitted on these maps (e.g. too few for a refinement)."""


def _best_tau(table: np.ndarray, taus: np.ndarray, idx: np.ndarray, levels) -> float:
    return metrics.sweep_of(table[:, idx], taus, levels).best_threshold


def fit(cand: Candidate, maps: Maps, table: np.ndarray, taus: np.ndarray, *, min_per_class: int = defaults.MIN_PER_CLASS,
        min_area: float = defaults.MIN_BOX_AREA, levels=metrics.IOU_LEVELS, shrink: float = 0.0,
        pool: RegressPool | None = None) -> Fitted:
    """Fit `cand` on `maps`, given `table` = metrics.iou_table of these maps with the candidate's box rule.
    A "regress" candidate self-trains its regressor on `pool` at the threshold fitted here.

    A class with at least `min_per_class` maps gets its own threshold, `metrics.shrunk_threshold` of its sweep's
    towards the overall one by `shrink` maps.

    Raises:
      CandidateError: the correction cannot be fitted (refine.RefineError's reason).
    """
    all_idx = np.arange(len(maps.normed))
    default = _best_tau(table, taus, all_idx, levels)
    per_class, own = {}, {}
    if cand.per_class:
        for c in np.unique(maps.classes):
            sel = np.flatnonzero(maps.classes == c)
            if len(sel) >= min_per_class:
                own[int(c)] = (_best_tau(table, taus, sel, levels), len(sel))
                per_class[int(c)] = metrics.shrunk_threshold(own[int(c)][0], len(sel), default, shrink)
    fitted = Fitted(cand, default, per_class, own, min_area=min_area)
    if cand.post == "stretch":
        xyxy, has = fitted.boxes(maps.normed, maps.valid, maps.classes)
        if not has.all():
            raise CandidateError("a box stretch needs a box on every map")
        stretch, _, _ = metrics.fit_box_stretch(xyxy, maps.truths, maps.normed.shape[1:], levels=levels)
        fitted = dataclasses.replace(fitted, stretch=stretch)
    elif cand.post == "refine":
        # The base threshold is chosen with the refinement, by the refinement's own cross-validation.
        best = None
        for base in sorted({default, *REFINE_BASES}):
            try:
                refiner, rep = refine.fit(maps.normed, base, maps.truths, valid=maps.valid)
            except refine.RefineError as exc:
                raise CandidateError(str(exc)) from None
            score = rep.refined[rep.chosen_alpha].mean()
            if best is None or score > best[0] + 1e-12:
                best = (score, base, refiner)
        fitted = dataclasses.replace(fitted, default=float(best[1]), per_class={}, per_class_fitted={},
                                     refiner=best[2])
    elif cand.post == "regress":
        if pool is None or maps.desc is None:
            raise CandidateError("a box regressor needs the pool of images to self-train on and descriptors")
        fitted = dataclasses.replace(fitted, regressor=pool.fit(fitted.default, min_area))
    return fitted


def folds_of(classes: np.ndarray, k: int = FOLDS) -> np.ndarray:
    """int (N,) fold of each map: the i-th map of each class goes to fold i % k (every fold sees every class)."""
    classes = np.asarray(classes)
    fold = np.zeros(len(classes), np.int64)
    for c in np.unique(classes):
        sel = np.flatnonzero(classes == c)
        fold[sel] = np.arange(len(sel)) % k
    return fold


@dataclasses.dataclass(frozen=True)
class Score:
    """A candidate's cross-validated accuracy per IoU level (None with the reason when it could not be fitted)."""

    candidate: Candidate
    accuracy: np.ndarray | None  # (len(levels),)
    reason: str = ""

    @property
    def mean(self) -> float:
        return float(self.accuracy.mean()) if self.accuracy is not None else float("-inf")


def cross_validate(cand: Candidate, maps: Maps, table: np.ndarray, taus: np.ndarray, *, folds: int = FOLDS,
                   min_per_class: int = defaults.MIN_PER_CLASS, min_area: float = defaults.MIN_BOX_AREA,
                   levels=metrics.IOU_LEVELS, shrink: float = 0.0, pool: RegressPool | None = None) -> Score:
    """Fit on all folds but one, box the held-out one, over every fold; accuracy of the held-out boxes."""
    n = len(maps.normed)
    k = max(2, min(folds, n))
    fold = folds_of(maps.classes, k)
    ious = np.zeros(n, np.float32)
    try:
        for f in range(k):
            train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            if not len(test):
                continue
            got = fit(cand, maps.take(train), table[:, train], taus, min_per_class=min_per_class,
                      min_area=min_area, levels=levels, shrink=shrink, pool=pool)
            part = maps.take(test)
            xyxy, has = got.boxes(part.normed, part.valid, part.classes, part.desc)
            ious[test] = np.where(has, metrics.best_iou(xyxy, part.truths), 0.0)
    except CandidateError as exc:
        return Score(cand, None, str(exc))
    return Score(cand, np.array([(ious >= lv).mean() for lv in levels]))


@dataclasses.dataclass(frozen=True)
class Choice:
    """Every candidate's cross-validated score, in table order, and the winner refitted on all maps."""

    scores: list
    winner: Fitted

    @property
    def best(self) -> Score:
        return next(s for s in self.scores if s.candidate == self.winner.candidate)


def choose(maps_by_kind: dict, candidates: Sequence[Candidate] = CANDIDATES, *, folds: int = FOLDS,
           min_per_class: int = defaults.MIN_PER_CLASS, min_area: float = defaults.MIN_BOX_AREA, taus: np.ndarray | None = None,
           levels=metrics.IOU_LEVELS, shrink: float = 0.0, pool: RegressPool | None = None) -> Choice:
    """Cross-validate every candidate whose maps are in `maps_by_kind` ({MapKind: Maps}) and refit the best.
    Regress candidates need `pool` and the plain maps' `desc` (without them they are skipped).

    Ties go to the earlier candidate of the table. Raises CandidateError when none can be fitted.
    """
    taus = metrics.DEFAULT_TAUS if taus is None else np.asarray(taus, np.float32)
    tables, scores = {}, []
    for cand in candidates:
        maps = maps_by_kind.get(cand.maps)
        if maps is None or (cand.post == "regress" and (pool is None or maps.desc is None)):
            continue
        key = (cand.maps, cand.boxes)
        if key not in tables:
            tables[key] = metrics.iou_table(maps.normed, maps.truths, valid=maps.valid, taus=taus,
                                            mode=cand.boxes, min_area=min_area)
        scores.append(cross_validate(cand, maps, tables[key], taus, folds=folds, min_per_class=min_per_class,
                                     min_area=min_area, levels=levels, shrink=shrink, pool=pool))
    ranked = [s for s in scores if s.accuracy is not None]
    if not ranked:
        raise CandidateError("no candidate could be fitted: " + "; ".join(f"{s.candidate.name}: {s.reason}"
                                                                         for s in scores))
    best = max(ranked, key=lambda s: (round(s.mean, 12), -scores.index(s)))
    cand = best.candidate
    winner = fit(cand, maps_by_kind[cand.maps], tables[(cand.maps, cand.boxes)], taus, min_per_class=min_per_class,
                 min_area=min_area, levels=levels, shrink=shrink, pool=pool)
    return Choice(scores, winner)
