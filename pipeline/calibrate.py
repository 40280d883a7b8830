"""`weakloc calibrate`: choose CAM thresholds on a few boxed images, for `weakloc label --thresholds`.

    weakloc calibrate --input 'shards/calib-*.tfrecord' --model models/digits.keras --output models/digits.thresholds.json
    weakloc calibrate --input 'photos/fruit/test/*.jpg' --model fruit.keras --output fruit.thresholds.json

True boxes come from the TFRecord examples, from `--ground_truth VOC_DIR|COCO.json|TFRecords`, or, for image
files, from Pascal VOC XML beside them (same stem; or in an annots/ or annotations/ folder next to theirs).
For every (image, class with true boxes) pair, the CAM of that class is box-thresholded at tau = 0.00, 0.01, ...,
0.99; the chosen tau maximises box accuracy averaged over IoU 0.3/0.5/0.7 (the MaxBoxAccV2 criterion of
clovaai/wsolevaluation), over all pairs and per class where a class has `--min_per_class` pairs (pulled towards
the overall choice by `--shrink`). Writes
`{"default": t, "per_class": {name: t}, "calibration": {...curve...}}` and prints the curve. Written as
`<model>.thresholds.json`, `label` picks it up by itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Sequence

import numpy as np

from weakloc.models import boxes as boxlib
from weakloc.models import cam, defaults, detection, metrics, refine
from weakloc.models.thresholds import Thresholds

from . import ground_truth, inputs, options, progress
from .args import Parser, ground_truth_flag
from .options import OptionsError

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc calibrate", description=__doc__.splitlines()[0], parents=[ground_truth_flag(
        "true boxes to calibrate on", "the boxes the TFRecord examples carry, or VOC XML beside the image files")])
    ap.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="TFRecord shards whose examples carry true boxes (image/object/bbox/*), or image files "
                         "with VOC XML beside them or named by --ground_truth; repeatable")
    ap.add_argument("--output", required=True, help="thresholds JSON to write")
    ap.add_argument("--min_per_class", type=int, default=defaults.MIN_PER_CLASS,
                    help="a class gets its own threshold only with at least this many boxed images")
    ap.add_argument("--shrink", type=float, default=defaults.THRESHOLD_SHRINK,
                    help="pull each class's threshold towards the overall one as if this many more images had "
                         "chosen the overall one (0: no pull)")
    ap.add_argument("--flip_tta", action="store_true", help="calibrate mirrored-average CAMs (as label --flip_tta)")
    ap.add_argument("--boxes", choices=("largest", "union", "instances"), default="largest",
                    help="calibrate the box rule label will use (label --boxes); instances: also choose the "
                         "instance rule (relative area, peak, NMS IoU) with the threshold, by instance F1")
    ap.add_argument("--min_box_area", type=float, default=0.01, help="--boxes union: as label --min_box_area")
    ap.add_argument("--fit_box_stretch", action="store_true",
                    help="also choose a (width, height) stretch of the boxes on these images (label applies it)")
    ap.add_argument("--cam_contrast", action="store_true",
                    help="calibrate contrast CAMs (label --cam_contrast; recorded, so label follows by itself)")
    ap.add_argument("--refine_boxes", action="store_true",
                    help="also fit a box refinement on these images from each map's profile across thresholds "
                         "(models/refine.py; label applies it); kept only if cross-validation says it helps")
    ap.add_argument("--batch_size", type=int, default=defaults.CALIBRATE_BATCH_SIZE, help="images per forward pass")
    ap.add_argument("--label_offset", type=int, default=0,
                    help="subtract from integer box labels to get model class ids (as label --label_offset)")
    ap.add_argument("--input_format", choices=("tfrecord", "images"),
                    help="default: inferred from the pattern's extension")
    options.add_model_args(ap.add_argument_group("model"))
    options.add_class_map_args(ap.add_argument_group("class map (as label's; thresholds are then per dataset label)"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return ap


def class_maps(model: cam.CamMethod, examples, *, batch_size: int = 64, class_map=None,
               model_classes: Sequence[str] = ()):
    """CAMs of every (image, class with true boxes) pair, normalised, with the truths in model-input pixels.

    With a class map the classes are its dataset labels, each label's map combined from its model classes' as
    `label --class_map` combines them (labels mapped to nothing are left out); top-1 is right when the model's
    top class is one of the label's.

    Returns (normed float32 (N, H, W), valid bool (N,), truths list of (m, 4), class ids int (N,), top-1 correct
    bool (N,), images used).
    """
    h, w = model.input_size
    scale = np.array([w, h, w, h], np.float32)
    pixels, classes, truths, used = [], [], [], 0
    for ex in examples:
        ids = np.asarray(ex.gt_ids[: len(ex.gt_boxes)])
        known = sorted({int(c) for c in ids if c >= 0 and (class_map is None or class_map.members[c])})
        used += bool(known)
        for c in known:
            pixels.append(ex.pixels)
            classes.append(c)
            truths.append(ex.gt_boxes[: len(ids)][ids == c] * scale)
    if not pixels:
        raise OptionsError("no input carries true boxes of a class the model knows: nothing to calibrate on "
                           f"(model classes: {', '.join(list(model_classes)[:10]) or '?'})")
    normed, valid, top1 = [], [], []
    classes = np.asarray(classes, np.int32)
    if class_map is None:
        members = classes[:, None]
    else:  # each label's model classes, -1 padded
        width = max(len(class_map.members[c]) for c in classes)
        members = np.full((len(classes), width), -1, np.int32)
        for i, c in enumerate(classes.tolist()):
            members[i, : len(class_map.members[c])] = class_map.members[c]
    for s in range(0, len(pixels), batch_size):
        mem = members[s : s + batch_size]
        out = model(np.stack(pixels[s : s + batch_size]), extra=mem)
        k = out.top_classes.shape[1]
        if class_map is None:
            raw = out.column(k)
        else:
            raw = cam.upsample(np.stack([class_map.combine_maps(out.low_res[i, k + np.flatnonzero(row >= 0)])
                                         for i, row in enumerate(mem)]), out.size)
        n_, v_ = boxlib.normalize_cams(raw)
        normed.append(n_)
        valid.append(v_)
        top1.append((out.top_classes[:, :1] == mem).any(axis=1))
    return np.concatenate(normed), np.concatenate(valid), truths, classes, np.concatenate(top1), used


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        raise OptionsError(f"--output {args.output} exists; pass --overwrite to replace it")
    if args.min_per_class < 1:
        raise OptionsError(f"--min_per_class must be >= 1, got {args.min_per_class}")
    if args.shrink < 0:
        raise OptionsError(f"--shrink must be >= 0, got {args.shrink}")
    if args.refine_boxes and (args.fit_box_stretch or args.boxes != "largest"):
        raise OptionsError("--refine_boxes refines largest-component boxes and replaces the stretch: drop "
                           f"--fit_box_stretch and --boxes {args.boxes}")
    opened = options.open_model_from_args(args, flip_tta=args.flip_tta, contrast=args.cam_contrast)
    model, prep = options.build_method(opened, opened.spec, top_k=defaults.TOP_K), opened.spec.prep
    cmap = options.read_class_map(args, prep.class_names)
    if cmap is not None:
        options.check_input_labels(args, cmap)
    box_names = cmap.labels if cmap is not None else prep.class_names
    source = inputs.scan(args.input, input_format=args.input_format, class_names=box_names,
                         label_offset=args.label_offset, labels_from_folder="no")
    source.ground_truth = _ground_truth(args, source, box_names)
    examples = progress.counted(inputs.iterate(source, input_size=prep.input_size, label_offset=args.label_offset),
                                source.count, "calibrate: images read")
    normed, valid, truths, classes, top1, used = class_maps(model, examples, batch_size=args.batch_size,
                                                            class_map=cmap, model_classes=box_names)
    if args.boxes == "instances":
        cal = detection.calibrate_instances(normed, truths, classes, valid=valid, min_per_class=args.min_per_class)
    else:
        cal = metrics.calibrate(normed, truths, classes, valid=valid, min_per_class=args.min_per_class,
                                mode=args.boxes, min_area=args.min_box_area)
    # Each map's threshold as label will use it (per class where calibrated, shrunk towards the overall one): what
    # a stretch or refinement fits on.
    taus = np.array([cal.class_threshold(c, args.shrink) for c in classes], np.float32)
    thresholds = dataclasses.replace(cal.thresholds(box_names, shrink=args.shrink),
                                     cam_contrast=bool(args.cam_contrast))
    notes = ""
    if cal.instances is not None:
        r = cal.instances
        notes = (f"instance rule: components >= {r.min_rel_area:g} of the largest's area with peak >= "
                 f"{r.min_peak:g}, NMS IoU {r.nms_iou:g}\n")
    if args.fit_box_stretch:
        thresholds, note = _fit_stretch(thresholds, normed, taus, valid, truths, args, model.input_size)
        notes += note
    if args.refine_boxes:
        thresholds, note = _fit_refinement(thresholds, normed, taus, valid, truths)
        notes += note
    thresholds = dataclasses.replace(thresholds, calibration={
        "model": args.model,
        "inputs": list(args.input),
        "images": used,
        "pairs": len(classes),
        "flip_tta": args.flip_tta,
        "boxes": args.boxes,
        "min_box_area": args.min_box_area,
        "class_map": cmap.to_json(prep.class_names) if cmap is not None else None,
        "top1": float(top1.mean()),
        "min_per_class": args.min_per_class,
        "shrink": args.shrink,
        **_sweep_record(cal, box_names, args.shrink),
        # --boxes instances: the curve is instance F1 at the chosen rule, and its "MaxBoxAccV2" the same
        # best-per-level mean of F1 instead of accuracy.
        "curve_metric": "F1" if args.boxes == "instances" else "acc",
        "notes": [n for n in notes.splitlines() if n],
        "warnings": edge_warnings(thresholds),
        "output": args.output,
    })
    doc = thresholds.to_json()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(doc, f, indent=2)
    return doc


EDGE_LOW, EDGE_HIGH = 0.0, 0.99  # the ends of the sweep: a full-image box, or a speck at the hottest pixel


def edge_warnings(thresholds: Thresholds) -> list[str]:
    """A loud line for every threshold at an end of the sweep (full-image or near-empty boxes), also logged."""
    out = []
    for name, t in [("default", thresholds.default), *sorted(thresholds.per_class.items())]:
        if t is not None and (t <= EDGE_LOW or t >= EDGE_HIGH):
            what = "full-image boxes" if t <= EDGE_LOW else "boxes around the hottest pixels only"
            out.append(f"WARNING: threshold {name} = {t:.2f} is at the end of the sweep and gives {what}: the CAMs "
                       "do not localise these images; check the model and the boxes before labelling with it")
    for line in out:
        logger.warning("%s", line.removeprefix("WARNING: "))
    return out


def render(doc: dict) -> str:
    """What calibrate prints: the curve (every 0.05 and the choice), the choice, per-class thresholds, warnings."""
    cal = doc["calibration"]
    best = doc["default"]
    what = cal.get("curve_metric", "acc")
    lines = ["  tau   " + " ".join(f"{what + '@' + str(lv):>7s}" for lv in cal["levels"]) + "  mean"]
    for t, *acc in cal["curve"]:
        if round(t * 100) % 5 == 0 or t == best:
            mark = "  <- chosen" if t == best else ""
            lines.append(f"  {t:.2f}  {acc[0]:7.1%} {acc[1]:7.1%} {acc[2]:7.1%} {sum(acc) / len(acc):6.1%}{mark}")
    per = ", ".join(f"{k}={v:.2f} (fitted {cal['per_class'][k]['fitted_threshold']:.2f} on "
                    f"{cal['per_class'][k]['pairs']})" for k, v in doc["per_class"].items())
    per = per or f"none (fewer than --min_per_class {cal['min_per_class']} boxed images per class)"
    return ("\n".join(lines) + f"\n\nimages: {cal['images']} ({cal['pairs']} image-class pairs), top-1 on them "
            f"{cal['top1']:.1%}\ndefault threshold: {best:.2f}   "
            f"{'max instance F1' if what == 'F1' else 'MaxBoxAccV2'}: {cal['max_box_acc_v2']:.1f}\n"
            f"per-class thresholds: {per}\n" + "".join(n + "\n" for n in cal["notes"] + cal["warnings"])
            + f"written: {cal['output']}")


def _ground_truth(args, source, class_names):
    """--ground_truth, else VOC XML beside image files, else the boxes TFRecords carry (None)."""
    if args.ground_truth:
        truth = ground_truth.load(args.ground_truth, class_names)
    elif source.input_format == "images":
        truth = ground_truth.beside_images(source.files)
        if truth is None:
            raise OptionsError(f"no true boxes for the {source.count} image files of --input: no VOC XML beside "
                               "them (same stem, or in annots/ or annotations/ next to their folder); pass "
                               "--ground_truth VOC_DIR|COCO.json")
        logger.info("true boxes from VOC XML beside the images: %s", ", ".join(truth.origin[:3]))
    else:
        return None
    names = truth.class_names()
    if names and not set(class_names).intersection(names):
        raise OptionsError(f"the true boxes name {', '.join(names[:8])}, none of which is a model class "
                           f"({', '.join(list(class_names)[:8])})")
    return truth


def _fit_stretch(thresholds: Thresholds, normed, taus, valid, truths, args, input_size) -> tuple[Thresholds, str]:
    """--fit_box_stretch: the (width, height) stretch that best fits the boxes at each map's threshold."""
    found = boxlib.boxes_from_cams(normed, taus, valid=valid, mode=args.boxes, min_area=args.min_box_area)
    if args.boxes != "largest" or len(found.map_index) != len(taus):
        logger.warning("box stretch not fitted: needs --boxes largest and a box on every map")
        return thresholds, ""
    stretch, after, before = metrics.fit_box_stretch(found.xyxy, [truths[i] for i in found.map_index], input_size)
    note = (f"box stretch: width x{stretch[0]:.2f}, height x{stretch[1]:.2f} "
            f"(mean accuracy {before:.1%} -> {after:.1%} on these images)\n")
    return dataclasses.replace(thresholds, box_stretch=tuple(stretch)), note


def _fit_refinement(thresholds: Thresholds, normed, taus, valid, truths) -> tuple[Thresholds, str]:
    """--refine_boxes: fit the refinement, kept only where cross-validation shows a gain; its record either way."""
    try:
        refiner, rep = refine.fit(normed, taus, truths, valid=valid)
    except refine.RefineError as exc:
        raise OptionsError(str(exc)) from None
    after = rep.refined[rep.chosen_alpha]

    def fmt(acc):
        return " / ".join(f"{v:.1%}" for v in acc)

    keep = rep.helps
    note = (f"box refinement ({rep.folds}-fold cross-validated on {rep.pairs} maps, penalty "
            f"{rep.chosen_alpha:g}): accuracy @0.3/0.5/0.7 {fmt(rep.base)} -> {fmt(after)} "
            f"({'kept' if keep else 'NOT kept: no gain'})\n")
    record = {"pairs": rep.pairs, "folds": rep.folds, "chosen_alpha": rep.chosen_alpha, "kept": keep,
              "cv_accuracy_before": rep.base.tolist(),
              "cv_accuracy_after": {str(a): v.tolist() for a, v in rep.refined.items()}}
    return dataclasses.replace(thresholds, box_refine=refiner if keep else None, box_refine_fit=record), note


def _sweep_record(cal: metrics.Calibration, class_names, shrink: float) -> dict:
    """The curve and the per-class choices, as the thresholds file's `calibration` records them."""
    sweep = cal.overall
    return {
        "max_box_acc_v2": sweep.max_box_acc_v2,
        "best_mean_accuracy": float(sweep.accuracy[sweep.best_index].mean()),
        "levels": list(sweep.levels),
        "curve": [[float(t), *map(float, a)] for t, a in zip(sweep.taus, sweep.accuracy)],
        "per_class": {
            class_names[c]: {
                "pairs": cal.counts[c],
                "fitted_threshold": cal.per_class[c].best_threshold if c in cal.per_class else None,
                "threshold": cal.class_threshold(c, shrink) if c in cal.per_class else None,
                "max_box_acc_v2": cal.per_class[c].max_box_acc_v2 if c in cal.per_class else None,
            }
            for c in sorted(cal.counts)
        },
    }
