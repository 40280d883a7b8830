"""One batch of model outputs to annotation rows: choose classes, box their CAMs, map boxes to the original image.

Pure numpy on whole batches: all chosen maps of a batch are normalised and labelled together (see boxes.py).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from . import boxes as boxlib
from .cam import CamOutputs, upsample
from .classmap import ClassMap
from .refine import BoxRefiner
from .regressor import BoxRegressor

CLASS_MODES = ("predicted", "labels", "both")
BOX_MODES = ("largest", "all", "union", "instances")


@dataclasses.dataclass(frozen=True)
class BoxOptions:
    """How classes are chosen and maps become boxes (validated once, when the pipeline is built).

    classes: "predicted" (top_k classes with probability >= min_score), "labels" (the image's own labels), "both".
    default_threshold: tau for classes without their own; per_class: class id -> tau.
    mode: "largest" component, "all" components covering >= min_area of the map, their "union", or
      "instances": one box per object under the `instances` rule, each box's score the class probability times
      the instance's peak (so a detector, and AP, rank a map's weaker peaks below its strongest).
    refine: a BoxRefiner fitted by calibrate (mode "largest" only; replaces the stretch).
    regressor: a self-trained BoxRegressor (calibrate's regress rows; mode "largest" only, no refinement or
      stretch): each box becomes regress_blend of the image's regressed box and the rest its own; it reads the
      batch's feature maps (a method built with features).
    """

    classes: str = "predicted"
    top_k: int = 1
    min_score: float = 0.0
    default_threshold: float = 0.2
    per_class: Mapping[int, float] = dataclasses.field(default_factory=dict)
    mode: str = "largest"
    min_area: float = 0.01
    emit_cams: bool = False
    stretch: tuple[float, float] = (1.0, 1.0)
    refine: BoxRefiner | None = None
    instances: boxlib.InstanceRule = dataclasses.field(default_factory=boxlib.InstanceRule)
    class_map: ClassMap | None = None  # dataset labels -> model classes; with classes "labels" only
    regressor: BoxRegressor | None = None
    regress_blend: float = 1.0

    def __post_init__(self):
        if self.regressor is not None and (self.mode != "largest" or self.refine is not None
                                           or tuple(self.stretch) != (1.0, 1.0)):
            raise ValueError("the box regressor was self-trained on largest-component boxes and replaces them: it "
                             "cannot go with another box rule, a refinement or a stretch")
        if not 0.0 < float(self.regress_blend) <= 1.0:
            raise ValueError(f"regress_blend must be within (0, 1], got {self.regress_blend}")
        if self.classes not in CLASS_MODES:
            raise ValueError(f"classes must be one of {CLASS_MODES}, got {self.classes!r}")
        if self.mode not in BOX_MODES:
            raise ValueError(f"boxes must be one of {BOX_MODES}, got {self.mode!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        for name, val in (("min_score", self.min_score), ("cam_threshold", self.default_threshold),
                          ("min_box_area", self.min_area)):
            if not 0.0 <= float(val) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {val}")
        if len(self.stretch) != 2 or not all(0.0 < float(f) <= 4.0 for f in self.stretch):
            raise ValueError(f"box stretch must be two factors within (0, 4], got {self.stretch!r}")
        if self.refine is not None and self.mode != "largest":
            raise ValueError(f"box refinement is fitted on largest-component boxes; it cannot refine boxes "
                             f"{self.mode!r}")
        if self.refine is not None and tuple(self.stretch) != (1.0, 1.0):
            raise ValueError("box refinement and a box stretch both correct box sizes; use one of them")
        if self.class_map is not None and self.classes != "labels":
            raise ValueError(f"a class map boxes the images' own labels: it needs classes 'labels', got "
                             f"{self.classes!r}")
        for cid, tau in self.per_class.items():
            if not 0.0 <= float(tau) <= 1.0:
                raise ValueError(f"threshold for class {cid} must be within [0, 1], got {tau}")

    def threshold(self, class_id: int) -> float:
        return float(self.per_class.get(int(class_id), self.default_threshold))


@dataclasses.dataclass
class ImageMeta:
    """Everything about one input image except its pixels.

    label_ids: model class ids of the image-level labels (-1 for a label the model does not know);
    label_texts: their names. gt_boxes: normalised x0y0x1y1 of the picture as a viewer sees it (the decode step
    turns boxes stored for an EXIF-rotated picture), carried for evaluation.
    """

    image_id: str
    source: str
    width: int
    height: int
    label_ids: list[int] = dataclasses.field(default_factory=list)
    label_texts: list[str] = dataclasses.field(default_factory=list)
    gt_boxes: list[list[float]] = dataclasses.field(default_factory=list)
    gt_ids: list[int] = dataclasses.field(default_factory=list)
    gt_texts: list[str] = dataclasses.field(default_factory=list)


def padded_ids(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Lists of class ids of different lengths -> int32 (len(rows), longest), -1 padded at the end: the `extra`
    argument of a CAM method's call."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def extra_classes(metas: Sequence[ImageMeta], opts: BoxOptions) -> np.ndarray:
    """int32 (B, M) model class ids to request CAMs for, -1 padded; M = 0 unless labels are used. With a class
    map, the label ids are dataset labels and every model class mapped from them is requested."""
    if opts.classes == "predicted":
        return np.zeros((len(metas), 0), np.int32)
    if opts.class_map is not None:
        members = opts.class_map.members
        ids = [list(dict.fromkeys(c for j in m.label_ids if j >= 0 for c in members[j])) for m in metas]
    else:
        ids = [[c for c in dict.fromkeys(m.label_ids) if c >= 0] for m in metas]
    return padded_ids(ids)


def annotate_batch(
    out: CamOutputs,
    metas: Sequence[ImageMeta],
    class_names: Sequence[str],
    opts: BoxOptions,
    model_name: str,
    extra: np.ndarray,
) -> list[dict]:
    """Rows of the annotation table (schema.ANNOTATION_SCHEMA) for one batch.

    Args:
      out: model outputs for the batch; out.cam_classes is (B, k + M): top-k, then `extra`.
      metas: per image, in batch order.
      extra: the int32 (B, M) array passed to the model (-1 = padding).
    """
    k = out.top_classes.shape[1]
    top_classes, top_scores = out.top_classes.tolist(), out.top_scores.tolist()
    if opts.class_map is not None:
        pick_b, pick_c, raw, pick_score = _mapped_picks(out, metas, opts.class_map, extra)
        box_names = opts.class_map.labels
    else:
        pick_b, pick_c, raw, pick_score = _model_picks(out, opts, extra)
        box_names = class_names
    boxes_per_image = _box_rows(out, metas, opts, box_names, pick_b, pick_c, raw, pick_score)
    rows = []
    for b, meta in enumerate(metas):
        row = {
            "image_id": meta.image_id,
            "source": meta.source,
            "width": int(meta.width),
            "height": int(meta.height),
            "classes": [
                {"class_id": c, "label": class_names[c], "score": s}
                for c, s in zip(top_classes[b], top_scores[b])
            ],
            "boxes": boxes_per_image[b],
            "labels": [{"class_id": int(c), "label": t} for c, t in zip(meta.label_ids, meta.label_texts)],
            "gt_boxes": gt_rows(meta),
            "model": model_name,
        }
        if opts.emit_cams:
            row["cams"] = [
                {
                    "class_id": int(out.cam_classes[b, m]),
                    "height": int(out.low_res.shape[2]),
                    "width": int(out.low_res.shape[3]),
                    "values": out.low_res[b, m].astype(np.float32).ravel().tolist(),
                }
                for m in range(out.cam_classes.shape[1])
                if m < k or extra[b, m - k] >= 0
            ]
        rows.append(row)
    return rows


def _box_rows(out: CamOutputs, metas: Sequence[ImageMeta], opts: BoxOptions, box_names: Sequence[str],
              pick_b: np.ndarray, pick_c: np.ndarray, raw: np.ndarray, pick_score: np.ndarray) -> list[list[dict]]:
    """Per image, the box rows of its picked maps (`raw` (n, H_in, W_in), of image pick_b[i] and class
    pick_c[i]): thresholded, refined or stretched as `opts` says, scaled to original pixels."""
    h_in, w_in = out.size
    boxes_per_image: list[list[dict]] = [[] for _ in range(len(metas))]
    if not len(pick_b):
        return boxes_per_image
    normed, valid = boxlib.normalize_cams(raw)
    taus = np.array([opts.threshold(c) for c in pick_c.tolist()], np.float32)
    found = boxlib.boxes_from_cams(normed, taus, valid=valid, mode=opts.mode, min_area=opts.min_area,
                                   instances=opts.instances)
    xyxy = found.xyxy
    if opts.refine is not None:
        xyxy, _ = opts.refine.apply(normed[found.map_index], taus[found.map_index], valid[found.map_index])
    if tuple(opts.stretch) != (1.0, 1.0):
        xyxy = boxlib.stretch_boxes(xyxy, opts.stretch, (h_in, w_in))
    if opts.regressor is not None:
        if out.features is None:
            raise ValueError("the box regressor reads the feature maps: build the method with features=True")
        predicted = opts.regressor.boxes(out.features)[pick_b[found.map_index]]
        xyxy = regressed(xyxy, predicted, (h_in, w_in), opts.regress_blend)
    # Every box to original pixels at once (boxlib.scale_boxes' arithmetic, vectorised over the batch).
    box_b = pick_b[found.map_index]
    box_c = pick_c[found.map_index]
    sizes = np.array([(m.width, m.height) for m in metas], np.float64).reshape(-1, 2)[box_b]
    factors = np.concatenate([sizes / (w_in, h_in)] * 2, axis=1)
    scaled = (np.asarray(xyxy, np.float64) * factors).astype(np.float32).tolist()
    scores = pick_score[found.map_index]
    scores = (scores * found.peak if found.peak is not None else scores).tolist()
    cam_scores = found.cam_score.tolist()
    for b, c, (x0, y0, x1, y1), score, cam_score in zip(box_b.tolist(), box_c.tolist(), scaled, scores,
                                                        cam_scores):
        boxes_per_image[b].append(
            {
                "class_id": c,
                "label": box_names[c],
                "score": score,
                "cam_score": cam_score,
                "xmin": x0,
                "ymin": y0,
                "xmax": x1,
                "ymax": y1,
            }
        )
    return boxes_per_image


def regressed(base: np.ndarray, predicted: np.ndarray, size, blend: float) -> np.ndarray:
    """float32 (n, 4): `blend` of the regressor's normalised boxes (n, 4), in pixels of `size` (H, W), and
    (1 - blend) of the maps' own boxes `base` (n, 4) in those pixels (the one formula calibrate scores too)."""
    h, w = size
    return (blend * np.asarray(predicted, np.float32) * np.array([w, h, w, h], np.float32)
            + (1.0 - blend) * np.asarray(base, np.float32)).astype(np.float32)


def pick_maps(out: CamOutputs, extra: np.ndarray, opts: BoxOptions) -> list[tuple[int, int, int]]:
    """(image, map index, class id) of every model class of the batch that gets boxes: the top-k classes scoring
    at least min_score and/or the image's own labels (`extra`, -1 padded), each class once per image."""
    k = out.top_classes.shape[1]
    picks: list[tuple[int, int, int]] = []  # (image, map index, class id)
    passes = (out.top_scores >= opts.min_score).tolist()  # compared in float32, as the scores are
    top_classes, wanted = out.top_classes.tolist(), extra.tolist()
    for b in range(len(top_classes)):
        seen = set()
        if opts.classes in ("predicted", "both"):
            for m, (c, ok) in enumerate(zip(top_classes[b], passes[b])):
                if ok:
                    seen.add(c)
                    picks.append((b, m, c))
        if opts.classes in ("labels", "both"):
            for j, c in enumerate(wanted[b]):
                if c >= 0 and c not in seen:
                    seen.add(c)
                    picks.append((b, k + j, c))
    return picks


def _model_picks(out: CamOutputs, opts: BoxOptions, extra: np.ndarray):
    """(image, class id, raw map (n, H_in, W_in), class probability) of every model class that gets boxes."""
    picks = pick_maps(out, extra, opts)
    pick_b, pick_m, pick_c = (np.array([p[i] for p in picks], np.int64) for i in range(3))
    if not picks:
        return pick_b, pick_c, np.zeros((0, *out.size), np.float32), np.zeros(0, np.float32)
    return pick_b, pick_c, out.maps(pick_b, pick_m), out.scores[pick_b, pick_c]


def _mapped_picks(out: CamOutputs, metas: Sequence[ImageMeta], cmap: ClassMap, extra: np.ndarray):
    """As `_model_picks`, for the dataset labels of each image through a class map: a label's map combines its
    model classes' raw maps at feature-map resolution (then upsampled); its score is their probabilities' sum."""
    k = out.top_classes.shape[1]
    pick_b, pick_c, lows, scores = [], [], [], []
    for b, (meta, wanted) in enumerate(zip(metas, extra.tolist())):
        column = {c: k + j for j, c in enumerate(wanted) if c >= 0}
        for lab in dict.fromkeys(j for j in meta.label_ids if j >= 0):
            members = list(cmap.members[lab])
            if not members:
                continue
            pick_b.append(b)
            pick_c.append(lab)
            lows.append(cmap.combine_maps(out.low_res[b, [column[c] for c in members]]))
            scores.append(out.scores[b, members].sum())
    if not lows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, *out.size), np.float32), np.zeros(0)
    return (np.array(pick_b, np.int64), np.array(pick_c, np.int64), upsample(np.stack(lows), out.size),
            np.array(scores, np.float32))


def gt_rows(meta: ImageMeta) -> list[dict]:
    """Ground-truth boxes of an image in original pixels."""
    out = []
    for j, (x0, y0, x1, y1) in enumerate(meta.gt_boxes):
        out.append(
            {
                "class_id": int(meta.gt_ids[j]) if j < len(meta.gt_ids) else -1,
                "label": meta.gt_texts[j] if j < len(meta.gt_texts) else "",
                "xmin": float(x0) * meta.width,
                "ymin": float(y0) * meta.height,
                "xmax": float(x1) * meta.width,
                "ymax": float(y1) * meta.height,
            }
        )
    return out


def resolve_labels(
    ids: Sequence[int],
    texts: Sequence[str],
    class_names: Sequence[str],
    *,
    id_offset: int = 0,
    index: Mapping[str, int] | None = None,
) -> tuple[list[int], list[str]]:
    """Image-level labels to model class ids.

    A text that names a model class wins; otherwise the integer, minus `id_offset` (1 for the TF Object
    Detection API's 1-based label maps), if it indexes a class. Unknown labels keep class id -1. `index`
    ({name: position in class_names}) saves rebuilding it for every image.
    """
    if index is None:
        index = {n: i for i, n in enumerate(class_names)}
    n = max(len(ids), len(texts))
    out_ids, out_texts = [], []
    for j in range(n):
        text = texts[j] if j < len(texts) else None
        cid = -1
        if text is not None and text in index:
            cid = index[text]
        elif j < len(ids) and 0 <= ids[j] - id_offset < len(class_names):
            cid = ids[j] - id_offset
            text = text or class_names[cid]
        out_ids.append(cid)
        out_texts.append(text if text is not None else str(ids[j]))
    return out_ids, out_texts
