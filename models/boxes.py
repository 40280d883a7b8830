"""From class activation maps to boxes: normalise, threshold, connected components, bounding boxes.

The recipe is the CAM paper's as clovaai/wsolevaluation evaluates it: min-max normalise each map to [0, 1], keep
pixels >= tau, take the bounding box of the largest 8-connected component. Box convention everywhere in weakloc:
x0y0x1y1 in continuous pixel coordinates, pixel (i, j) covering [j, j+1) x [i, i+1), so the max edge is exclusive
and a one-pixel box is (j, i, j+1, i+1). The whole batch is labelled by one OpenCV call (see `components`).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# scipy.ndimage is imported where it is used (instance candidates, peak splitting, boxing many components at
# once): it costs a fresh worker 0.25-0.45 s of start-up, and the default mode ("largest") never calls it.


def normalize_cams(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalise each map independently.

    Args:
      cams: float (N, H, W), any range; NaN and +-inf are treated as the map's minimum.

    Returns:
      (normed, valid): float32 (N, H, W) in [0, 1] with max 1 where valid, zeros elsewhere; bool (N,) False
      for maps that carry no spatial evidence (constant, or no finite value at all).
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"expected cams of shape (N, H, W), got {cams.shape}")
    lo, hi = cams.min(axis=(1, 2)), cams.max(axis=(1, 2))
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        # The usual case, in three passes over the maps instead of a dozen: every value is finite.
        valid = hi > lo
        span = np.where(valid, hi - lo, 1.0).astype(np.float32)
        normed = cams - lo[:, None, None]
        normed /= span[:, None, None]
        normed[~valid] = 0.0
        return normed, valid
    finite = np.isfinite(cams)
    big = np.finfo(np.float32).max
    lo = np.where(finite, cams, big).min(axis=(1, 2))
    hi = np.where(finite, cams, -big).max(axis=(1, 2))
    valid = finite.any(axis=(1, 2)) & (hi > lo)
    base = np.where(valid, lo, 0.0).astype(np.float32)
    span = np.where(valid, np.where(valid, hi, 1.0) - base, 1.0).astype(np.float32)
    normed = (np.where(finite, cams, base[:, None, None]) - base[:, None, None]) / span[:, None, None]
    normed = np.where(valid[:, None, None], np.clip(normed, 0.0, 1.0), 0.0).astype(np.float32)
    return normed, valid


@dataclasses.dataclass(frozen=True)
class Boxes:
    """Boxes found in a stack of maps, as flat arrays (one entry a box).

    map_index: int64 (n,) which map each box came from.
    xyxy: float32 (n, 4) x0, y0, x1, y1 in the maps' pixel coordinates, max edge exclusive.
    cam_score: float32 (n,) mean normalised CAM inside the box.
    area: int64 (n,) pixels in the component (not the box).
    peak: float32 (n,) the highest normalised CAM value in the component (mode "instances" only, else None):
      the instance's own score, 1.0 for the component that holds the map's maximum.
    """

    map_index: np.ndarray
    xyxy: np.ndarray
    cam_score: np.ndarray
    area: np.ndarray
    peak: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class InstanceRule:
    """Which components of one class's map become separate instance boxes (`--boxes instances`).

    min_rel_area: a component needs at least this share of the pixels of its map's largest component (relative,
      so one rule fits small and large objects alike); min_peak: its highest normalised CAM value must reach
      this (the map's own maximum is 1, so this too is relative); nms_iou: of two kept boxes of one map whose
      IoU exceeds it, the one with the lower peak goes (1.0 keeps every box). The map's largest component is
      always a candidate, so every map with foreground keeps at least one box.
    peak_distance: 0 keeps components whole; above 0, local maxima of the map at least this far apart (a share of
      the map's longer side) split the component that holds them by a watershed, one region a peak, so two
      touching objects give two boxes (see `split_by_peaks`).
    """

    min_rel_area: float = 0.1
    min_peak: float = 0.0
    nms_iou: float = 0.5
    peak_distance: float = 0.0

    def __post_init__(self):
        for name in ("min_rel_area", "min_peak", "nms_iou", "peak_distance"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) <= 1.0:
                raise ValueError(f"instance rule: {name} must be a number within [0, 1], got {val!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc) -> "InstanceRule":
        if not isinstance(doc, dict) or set(doc) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("instance rule: expected an object with keys min_rel_area, min_peak, nms_iou "
                             f"(and optionally peak_distance), got {doc!r}")
        return cls(**doc)


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Every component of a stack of thresholded maps, with what an `InstanceRule` reads (see `candidates`).

    map_index, xyxy, area, peak: as in `Boxes`, one entry a component, ordered by map, then by decreasing peak,
    then decreasing area, then raster order (the order NMS visits them). rel_area: float32 (n,) area over the
    largest component's area in the same map; largest: bool (n,) the map's largest component (`Components.ranked`).
    """

    map_index: np.ndarray
    xyxy: np.ndarray
    area: np.ndarray
    peak: np.ndarray
    rel_area: np.ndarray
    largest: np.ndarray

    def select(self, rule: InstanceRule) -> np.ndarray:
        """int64 indices of the candidates `rule` keeps, in candidate order: the area and peak tests (the
        largest component always passes), then one batched NMS call with the maps as NMS classes."""
        keep = np.flatnonzero(self.largest | ((self.rel_area >= rule.min_rel_area) & (self.peak >= rule.min_peak)))
        if len(keep) <= 1 or rule.nms_iou >= 1.0:
            return keep
        xywh = self.xyxy[keep].astype(np.float64)
        xywh[:, 2:] -= xywh[:, :2]
        # The candidates are already in visiting order: strictly decreasing ranks make OpenCV keep it exactly.
        rank = np.linspace(1.0, 0.5, len(keep), dtype=np.float32)
        kept = cv2.dnn.NMSBoxesBatched(xywh, rank, self.map_index[keep].astype(np.int32), -1.0,
                                       float(rule.nms_iou))
        return keep[np.sort(np.asarray(kept, np.int64).ravel())]


def boxes_from_cams(
    normed: np.ndarray,
    thresholds: np.ndarray | float,
    *,
    valid: np.ndarray | None = None,
    mode: str = "largest",
    min_area: float = 0.0,
    instances: InstanceRule | None = None,
) -> Boxes:
    """Threshold normalised maps and box their connected components.

    Args:
      normed: float (N, H, W) in [0, 1], e.g. from `normalize_cams`.
      thresholds: tau, scalar or (N,): a pixel is foreground when normed >= tau.
      valid: bool (N,); maps marked False get no box. Default: all valid.
      mode: "largest": one box per map, around its largest 8-connected component (ties: first in raster
        order); "all": every component covering at least `min_area` of the map, and always the largest;
        "union": one box per map enclosing all the components "all" would keep (an object the map splits into
        pieces gets one box); "instances": one box per object, the components `instances` keeps (see
        `InstanceRule`), each with its peak as its score.
      min_area: fraction of H*W, used by modes "all" and "union".
      instances: the rule of mode "instances" (default `InstanceRule()`).

    Returns:
      Boxes, ordered by map index, then (mode "all") by decreasing component area, (mode "instances") by
      decreasing peak. A map with no foreground pixel (every value below tau) gets no box.
    """
    normed = np.asarray(normed, dtype=np.float32)
    if normed.ndim != 3:
        raise ValueError(f"expected normalised maps of shape (N, H, W), got {normed.shape}")
    if mode not in ("largest", "all", "union", "instances"):
        raise ValueError(f"mode must be 'largest', 'all', 'union' or 'instances', got {mode!r}")
    if mode == "instances":
        rule = instances or InstanceRule()
        cands = candidates(normed, thresholds, valid, peak_distance=rule.peak_distance)
        keep = cands.select(rule)
        return Boxes(cands.map_index[keep], cands.xyxy[keep],
                     _box_means(normed, cands.map_index[keep], cands.xyxy[keep]), cands.area[keep], cands.peak[keep])
    n, h, w = normed.shape
    comps = threshold_components(normed, thresholds, valid)
    if comps.count == 0:
        return Boxes(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.int64))
    sizes, map_of = comps.sizes, comps.map_of
    order, first = comps.ranked()
    if mode == "largest":
        keep = order[first]
    else:  # "all" and "union"
        is_largest = np.zeros(comps.count, dtype=bool)
        is_largest[order[first]] = True
        big_enough = sizes >= min_area * h * w
        keep = order[(big_enough | is_largest)[order]]
    xyxy = comps.boxes(keep + 1)
    if mode == "union":
        maps, first = np.unique(map_of[keep], return_index=True)
        xyxy = np.concatenate([np.minimum.reduceat(xyxy[:, :2], first), np.maximum.reduceat(xyxy[:, 2:], first)], 1)
        return Boxes(maps.astype(np.int64), xyxy, _box_means(normed, maps, xyxy),
                     np.add.reduceat(sizes[keep], first).astype(np.int64))
    return Boxes(map_of[keep], xyxy, _box_means(normed, map_of[keep], xyxy), sizes[keep].astype(np.int64))


def candidates(normed: np.ndarray, thresholds, valid: np.ndarray | None = None, *,
               peak_distance: float = 0.0) -> Candidates:
    """Every component of the maps normed >= tau, boxed, with its peak and relative area (mode "instances").

    One labelling of the stack, one `scipy.ndimage.maximum` for every component's peak. Computed once per
    threshold (and peak distance), it serves any number of `InstanceRule`s of that distance (calibrate tries
    many). With `peak_distance` > 0 the components are first split by `split_by_peaks`.
    """
    from scipy import ndimage

    comps = threshold_components(normed, thresholds, valid)
    if peak_distance > 0 and comps.count:
        return _split_candidates(normed, comps, peak_distance)
    if comps.count == 0:
        z = np.zeros(0, np.int64)
        return Candidates(z, np.zeros((0, 4), np.float32), z, np.zeros(0, np.float32), np.zeros(0, np.float32),
                          np.zeros(0, bool))
    ids = np.arange(1, comps.count + 1)
    peak = np.asarray(ndimage.maximum(normed, comps.labels, ids), np.float32).reshape(-1)
    order, first = comps.ranked()
    largest = np.zeros(comps.count, bool)
    largest[order[first]] = True
    biggest = np.zeros(normed.shape[0], np.int64)
    biggest[comps.map_of[order[first]]] = comps.sizes[order[first]]
    visit = np.lexsort((ids, -comps.sizes, -peak, comps.map_of))
    return Candidates(comps.map_of[visit], comps.boxes(visit + 1), comps.sizes[visit], peak[visit],
                      (comps.sizes[visit] / biggest[comps.map_of[visit]]).astype(np.float32), largest[visit])


def split_by_peaks(normed: np.ndarray, labels: np.ndarray, peak_distance: float) -> np.ndarray:
    """Split components at their separate peaks: a marker-based watershed of one map.

    Args:
      normed: float (H, W) one normalised map in [0, 1].
      labels: int (H, W) its components, 0 for background.
      peak_distance: the least distance between two peaks that become separate regions, as a share of max(H, W)
        (at least one pixel).

    Returns:
      int32 (H, W) regions numbered 1..k (0 background), each the watershed basin of one local maximum of
      `normed` found by `skimage.feature.peak_local_max` (peaks closer than the distance merge into the higher,
      a flat top is one peak); a component with no such peak stays whole.
    """
    # Imported here: only --boxes instances with a peak distance needs scikit-image, so other workers never load it.
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    h, w = normed.shape
    distance = max(1, int(round(peak_distance * max(h, w))))
    peaks = peak_local_max(normed, min_distance=distance, labels=labels, exclude_border=False)
    # peak_local_max returns several pixels of one flat top: peaks on one connected plateau of regional-maximum
    # pixels share a marker, so a plateau is one instance, never split against itself.
    plateaus, n_plateaus = ndimage.label((normed == ndimage.maximum_filter(normed, size=3)) & (labels > 0),
                                         structure=np.ones((3, 3)))
    markers = np.zeros((h, w), np.int32)
    markers[tuple(peaks.T)] = plateaus[tuple(peaks.T)]
    # A component without a marker gets one of its own, so none is lost.
    ids = np.unique(labels[labels > 0])
    unmarked = np.setdiff1d(ids, np.unique(labels[markers > 0]))
    for k, c in enumerate(unmarked.tolist(), start=n_plateaus + 1):
        first = np.argmax(labels.ravel() == c)
        markers.flat[first] = k
    # Basins of -normed flooded from the peaks, confined to the components (no region crosses background).
    regions = watershed(-normed, markers, mask=labels > 0)
    return regions.astype(np.int32)


def _split_candidates(normed: np.ndarray, comps: "Components", peak_distance: float) -> Candidates:
    """`candidates` of the watershed regions of every map's components (see `split_by_peaks`)."""
    from scipy import ndimage

    maps, boxes, areas, peaks = [], [], [], []
    for m in np.flatnonzero(comps.per_map > 0).tolist():
        regions = split_by_peaks(normed[m], comps.labels[m], peak_distance)
        k = int(regions.max())
        ids = np.arange(1, k + 1)
        slices = ndimage.find_objects(regions, max_label=k)
        present = [i for i, sl in enumerate(slices) if sl is not None]
        ids = ids[present]
        maps.append(np.full(len(ids), m, np.int64))
        boxes.append(np.array([(slices[i][1].start, slices[i][0].start, slices[i][1].stop, slices[i][0].stop)
                               for i in present], np.float32).reshape(-1, 4))
        areas.append(np.bincount(regions.ravel(), minlength=k + 1)[ids].astype(np.int64))
        peaks.append(np.asarray(ndimage.maximum(normed[m], regions, ids), np.float32).reshape(-1))
    map_of, xyxy, area, peak = (np.concatenate(a) for a in (maps, boxes, areas, peaks))
    raster = np.arange(len(area))
    biggest = np.zeros(normed.shape[0], np.int64)
    np.maximum.at(biggest, map_of, area)
    # The largest region of each map (ties: first in raster order of the labels) always stays a candidate.
    by_size = np.lexsort((raster, -area, map_of))
    _, first = np.unique(map_of[by_size], return_index=True)
    largest = np.zeros(len(area), bool)
    largest[by_size[first]] = True
    visit = np.lexsort((raster, -area, -peak, map_of))
    return Candidates(map_of[visit], xyxy[visit], area[visit], peak[visit],
                      (area[visit] / biggest[map_of[visit]]).astype(np.float32), largest[visit])


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """The 8-connected components of a stack of masks (see `components`).

    labels: int32 (N, H, W), 0 for background and 1..count, numbered in raster order of their first pixel
      through the whole stack (map 0 first), exactly as `scipy.ndimage.label` numbers them.
    sizes: int64 (count,) pixels of component i + 1; map_of: int64 (count,) the map it lies in.
    """

    labels: np.ndarray
    count: int
    sizes: np.ndarray
    map_of: np.ndarray
    masks: np.ndarray  # uint8 (N, H, W) the masks that were labelled
    per_map: np.ndarray  # int64 (N,) how many components each map has

    def ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, first): component indices sorted by map, then decreasing size, then raster order (the tie
        rule of every largest-component choice); order[first] is each map's largest, for maps that have one."""
        order = np.lexsort((np.arange(self.count), -self.sizes, self.map_of))
        _, first = np.unique(self.map_of[order], return_index=True)
        return order, first

    def largest(self) -> np.ndarray:
        """int64 (N,) the label of each map's largest component; 0 for a map with none."""
        out = np.zeros(self.labels.shape[0], np.int64)
        order, first = self.ranked()
        out[self.map_of[order[first]]] = order[first] + 1
        return out

    def boxes(self, ids: np.ndarray) -> np.ndarray:
        """float32 (k, 4) x0y0x1y1 (max edge exclusive) of the components labelled ids (k,).

        A few components per map (the usual case: one, the largest) are boxed one by one by OpenCV's bounding
        rectangle of their own pixels (of the whole mask, when the map has no other component); many (mode
        "all" on fragmented maps) by one pass over the whole stack that boxes every component at once.
        """
        ids = np.asarray(ids, np.int64)
        if len(ids) > 8 * self.labels.shape[0]:
            from scipy import ndimage

            slices = ndimage.find_objects(self.labels, max_label=self.count)
            return np.array([(s[2].start, s[1].start, s[2].stop, s[1].stop) for s in (slices[i - 1] for i in ids)],
                            np.float32).reshape(-1, 4)
        out = np.empty((len(ids), 4), np.float32)
        alone = (self.per_map == 1).tolist()
        for i, (m, c) in enumerate(zip(self.map_of[ids - 1].tolist(), ids.tolist())):
            own = self.masks[m] if alone[m] else (self.labels[m] == c).view(np.uint8)
            x, y, bw, bh = cv2.boundingRect(own)
            out[i] = (x, y, x + bw, y + bh)
        return out


def components(mask: np.ndarray) -> Components:
    """8-connected components of a bool stack (N, H, W), none crossing from one map to the next, labelled by one
    OpenCV call for the whole stack."""
    n, h, w = mask.shape
    tall = _tall_stack(n, h, w)
    tall[:, :h] = mask
    return _components_of(tall)


def threshold_components(normed: np.ndarray, thresholds, valid: np.ndarray | None = None) -> Components:
    """`components` of the masks normed >= tau (tau scalar or one per map), with maps marked invalid left empty.

    The threshold writes straight into the stack OpenCV labels. Used by `boxes_from_cams` and by the box
    refinement, which must find the same components.
    """
    n, h, w = normed.shape
    tau = np.broadcast_to(np.asarray(thresholds, dtype=np.float32), (n,))
    tall = _tall_stack(n, h, w)
    np.greater_equal(normed, tau[:, None, None], out=tall[:, :h].view(bool))
    if valid is not None:
        tall[~np.asarray(valid, dtype=bool)] = 0
    return _components_of(tall)


def _tall_stack(n: int, h: int, w: int) -> np.ndarray:
    """uint8 zeros (N, H + 1, W): N masks of H x W, each followed by an empty separator row."""
    return np.zeros((n, h + 1, w), np.uint8)


def _components_of(tall: np.ndarray) -> Components:
    """`components` of the masks in a `_tall_stack` (foreground 1, separator rows left 0).

    One OpenCV call labels the whole batch: the maps are stacked into one tall image with an empty row between
    them, so no component reaches across. OpenCV's SAUF algorithm (CCL_WU) numbers components by their first
    pixel in raster order, which the box tie rule relies on (OpenCV's default, block-based algorithms do not);
    `tests/test_boxes.py` checks the numbering against scipy's on random maps. It is 5-8x faster than
    `scipy.ndimage.label` on a batch of 224x224 maps.
    """
    n, h1, w = tall.shape
    if tall.size == 0:
        empty = np.zeros(0, np.int64)
        return Components(np.zeros((n, h1 - 1, w), np.int32), 0, empty, empty, tall[:, : h1 - 1],
                          np.zeros(n, np.int64))
    count, labels = cv2.connectedComponentsWithAlgorithm(
        tall.reshape(n * h1, w), connectivity=8, ltype=cv2.CV_32S, ccltype=cv2.CCL_WU
    )
    count = int(count) - 1
    whole = labels.reshape(n, h1 * w)
    # Labels run in raster order through the stack, so each map owns one contiguous range of them: the running
    # maximum of each map's largest label says where every map's range ends.
    last = np.maximum.accumulate(whole.max(axis=1))
    map_of = np.searchsorted(last, np.arange(1, count + 1), side="left").astype(np.int64)
    per_map = np.diff(last, prepend=0)
    sizes = np.zeros(count, np.int64)
    # A map with one component (a smooth CAM's usual case): its size is the map's foreground count. Only the
    # maps split into several pay for a histogram of their labels.
    for m in np.flatnonzero(per_map == 1).tolist():
        sizes[last[m] - 1] = cv2.countNonZero(tall[m])
    multi = np.flatnonzero(per_map > 1)
    if len(multi):
        ids = np.concatenate([np.arange(last[m] - per_map[m], last[m]) for m in multi.tolist()])
        sizes[ids] = _pixel_counts(whole[multi] if len(multi) < n else whole, count)[ids]
    return Components(labels.reshape(n, h1, w)[:, : h1 - 1], count, sizes, map_of, tall[:, : h1 - 1], per_map)


def _pixel_counts(labels: np.ndarray, count: int) -> np.ndarray:
    """int64 (count,) how many pixels of `labels` carry each label 1..count.

    OpenCV's histogram of the labels as uint16 when they fit (exact: a bin holds fewer than 2**24 pixels, which
    float32 counts hold exactly), 2x faster than `np.bincount`, which first widens every label to int64.
    """
    if count < np.iinfo(np.uint16).max and labels.size < 1 << 24:
        hist = cv2.calcHist([labels.astype(np.uint16)], [0], None, [count + 1], [0, count + 1])
        return hist.ravel()[1:].astype(np.int64)
    return np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.int64)


def _box_means(normed: np.ndarray, maps: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """float32 (k,) mean of normed[maps[i]] inside box i (the cam_score)."""
    b = xyxy.astype(np.int64).tolist()
    return np.array([cv2.sumElems(normed[m, y0:y1, x0:x1])[0] / ((y1 - y0) * (x1 - x0))
                     for m, (x0, y0, x1, y1) in zip(maps.tolist(), b)], np.float32)


def stretch_boxes(xyxy: np.ndarray, factors: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Scale box widths by factors[0] and heights by factors[1] about their centres, clipped to the map.

    A CAM blob is round where objects often are not (digits are tall): a stretch chosen on boxed calibration
    images corrects that systematic shape error. xyxy: (n, 4) continuous pixels; size: (H, W) of the map.
    """
    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    half = (xyxy[:, 2:] - xyxy[:, :2]) / 2 * np.asarray(factors, np.float32)
    out = np.concatenate([centre - half, centre + half], axis=1)
    return np.clip(out, 0, np.array([size[1], size[0], size[1], size[0]], np.float32)).astype(np.float32)


def scale_boxes(xyxy: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Map boxes between two pixel grids of the same picture (sizes as (H, W)); continuous coordinates."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    sx = to_size[1] / from_size[1]
    sy = to_size[0] / from_size[0]
    return (xyxy * np.array([sx, sy, sx, sy])).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of a (n, 4) and every box of b (m, 4), x0y0x1y1 continuous; returns float (n, m).

    Keras's own `compute_iou` does the work; this wrapper fixes the format and hands back numpy.
    """
    from keras.utils import bounding_boxes

    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return np.asarray(bounding_boxes.compute_iou(a, b, bounding_box_format="xyxy"), dtype=np.float32)


# EXIF orientation (1-8) -> how a normalised stored-grid box x0y0x1y1 lands in the picture a viewer sees: which
# stored coordinate feeds each viewer coordinate, and whether it is mirrored (1 - v). Derived from the transposes
# Pillow's exif_transpose applies (2 flip L-R, 3 rotate 180, 4 flip T-B, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 counter-clockwise); tests check each against Pillow on a drawn mask.
_ORIENT = {
    # orientation: ((source axis for viewer x, mirrored), (source axis for viewer y, mirrored)); axis 0 = x
    1: ((0, False), (1, False)),
    2: ((0, True), (1, False)),
    3: ((0, True), (1, True)),
    4: ((0, False), (1, True)),
    5: ((1, False), (0, False)),
    6: ((1, True), (0, False)),
    7: ((1, True), (0, True)),
    8: ((1, False), (0, True)),
}


def orient_normalized_boxes(xyxy: np.ndarray, orientation: int) -> np.ndarray:
    """Map boxes normalised to an image's stored pixel grid into the grid a viewer sees after EXIF orientation.

    Args:
      xyxy: float (N, 4) x0y0x1y1 in [0, 1] of the stored (un-rotated) picture, as TensorFlow's decoders,
        which ignore EXIF, show it.
      orientation: the EXIF orientation tag, 1-8 (anything else is taken as 1).

    Returns:
      float32 (N, 4) x0y0x1y1 in [0, 1] of the picture as a viewer sees it (x0 <= x1, y0 <= y1 kept).
    """
    boxes = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
    (ax, mx), (ay, my) = _ORIENT.get(int(orientation), _ORIENT[1])
    lo = boxes[:, :2]
    hi = boxes[:, 2:]

    def axis(src, mirrored):
        a, b = lo[:, src], hi[:, src]
        return (1.0 - b, 1.0 - a) if mirrored else (a, b)

    x0, x1 = axis(ax, mx)
    y0, y1 = axis(ay, my)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
