"""`weakloc evaluate`: how good are the boxes of a `weakloc label` run, beside two baselines on the same images.

    weakloc evaluate --annotations labels/ --ground_truth 'shards/eval-*.tfrecord' [--output eval.json]

Ground truth comes from TFRecord shards (image/object/bbox/*, matched on the image id), a Pascal VOC folder of
XML files or a COCO JSON (both matched on the file name). Reports GT-known Loc (the box of the true class has
IoU >= delta), Top-1 Loc (and the top-1 class is right), per-class CorLoc and mean IoU at delta 0.3/0.5/0.7; the
boxes as a detector's (COCO AP, AP50 and AR@100 by pycocotools over every box ranked by its score, and the share
of true instances a one-to-one matching finds at IoU 0.5); and the same for a full-image box and a centred box of
the median true size, one per true class of an image (score 1). Boxes: x0y0x1y1 continuous pixels, max
edge exclusive; VOC's 1-based inclusive corners are converted (xmin - 1, ymin - 1, xmax, ymax).
"""
from __future__ import annotations

import argparse
import json
import logging

from apache_beam.io.filesystems import FileSystems

from weakloc.models import classmap, detection, metrics

from . import ground_truth, progress, results, storage
from .args import Parser, annotations_flag, ground_truth_flag
from .options import OptionsError, read_class_map

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc evaluate", description=__doc__.splitlines()[0], parents=[
        annotations_flag(),
        ground_truth_flag("true boxes to score the run against", "the boxes the annotation rows carry from their "
                          "TFRecord inputs")])
    ap.add_argument("--output", help="JSON report (default: <annotations>/evaluation.json)")
    ap.add_argument("--class_map", metavar="FILE",
                    help="JSON or CSV: dataset label -> model class names; boxes and top-1 classes of the model's "
                         "classes are scored as the dataset labels they map to (default: the class map the label "
                         "run used, if any)")
    return ap


def class_map_of(args, summary: dict, class_names) -> "classmap.ClassMap | None":
    """--class_map, else the class map the label run recorded, else None."""
    if args.class_map:
        return read_class_map(args, class_names)
    used = (summary.get("options") or {}).get("class_map")
    if not used:
        return None
    return classmap.parse_class_map(json.dumps(used["labels"]), class_names, combine=used["combine"])


def to_labels(rows: list[dict], cmap, model_names) -> None:
    """Name every box, top class and true box by its dataset label (in place): a model class becomes the label
    that maps it, a box of an unmapped class is dropped, a top class of an unmapped one gets class id -1, true
    boxes of a label mapped to nothing are dropped.

    Raises:
      OptionsError: a true box whose label the class map does not declare.
    """
    index = {lab: j for j, lab in enumerate(cmap.labels)}
    of = {model_names[c]: j for c, j in cmap.label_of().items()}

    def label_id(name):
        return index.get(name, of.get(name, -1))

    try:
        classmap.check_labels({g["label"] for r in rows for g in r["gt_boxes"]}, cmap, "the ground truth")
    except classmap.ClassMapError as exc:
        raise OptionsError(str(exc)) from None
    for row in rows:
        row["boxes"] = [dict(b, class_id=label_id(b["label"])) for b in row.get("boxes") or ()
                        if label_id(b["label"]) >= 0]
        row["classes"] = [dict(c, class_id=label_id(c["label"])) for c in row.get("classes") or ()]
        # A label mapped to no model class (raccoon for an ImageNet model) can have no box: its truths are left out.
        row["gt_boxes"] = [dict(g, class_id=index[g["label"]]) for g in row["gt_boxes"]
                           if cmap.members[index[g["label"]]]]


def _table(ev: dict) -> str:
    levels = sorted(ev["gt_known"])
    head = "".join(f"  @{lv:<5}" for lv in levels)
    lines = [f"{'':34s}{head}"]

    def line(name, vals):
        lines.append(f"{name:34s}" + "".join(f"  {vals[lv]:6.1%}" for lv in levels))

    line("GT-known Loc (weakloc)", ev["gt_known"])
    line("Top-1 Loc (weakloc)", ev["top1_loc"])
    line("GT-known Loc, full-image box", ev["baselines"]["full_image"]["gt_known"])
    line("GT-known Loc, centred median box", ev["baselines"]["centred_median"]["gt_known"])
    lines.append(f"\n{'as a detector (COCOeval)':34s}      AP    AP50  AR@100  instance recall@0.5")
    for name, det in (("weakloc", ev["detection"]), ("full-image box", ev["baselines"]["full_image"]["detection"]),
                      ("centred median box", ev["baselines"]["centred_median"]["detection"])):
        lines.append(f"{name:34s}  {det['ap']:6.1%}  {det['ap50']:6.1%}  {det['ar100']:6.1%}  {det['instance_recall']:6.1%}")
    d = ev["detection"]
    lines.append(f"{d['predicted_boxes']} predicted boxes, {d['instances']} true instances")
    lines.append(f"\nimages {ev['images']}, image-class pairs {ev['pairs']}, top-1 classification {ev['top1']:.1%}")
    lines.append(f"mean IoU: weakloc {ev['mean_iou']:.3f}, full image {ev['baselines']['full_image']['mean_iou']:.3f}, "
                 f"centred median {ev['baselines']['centred_median']['mean_iou']:.3f}\n")
    lines.append(f"{'class':16s} {'pairs':>6s} " + " ".join(f"CorLoc@{lv:<4}" for lv in levels) + "  mean IoU")
    for name, pc in ev["per_class"].items():
        lines.append(f"{name:16s} {pc['pairs']:6d} " + " ".join(f"{pc['corloc'][lv]:10.1%}" for lv in levels)
                     + f"  {pc['mean_iou']:8.3f}")
    return "\n".join(lines)


def _json_keys(obj):
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    return obj


def run(argv=None) -> dict:
    args, storage_flags = parser().parse_known_args(argv)
    storage.use_filesystem_flags(storage_flags)  # --s3_endpoint_url, ... as for `weakloc label`
    results.check_run_folder(args.annotations)
    try:
        summary = results.read_summary(args.annotations)
    except Exception:
        raise OptionsError(f"--annotations {args.annotations} holds no summary.json of a finished label run") from None
    class_names = summary["model"]["class_names"]
    rows = results.read_table(args.annotations, "annotations").to_pylist()
    if not rows:
        raise OptionsError(f"--annotations {args.annotations} holds no annotation rows")
    cmap = class_map_of(args, summary, class_names)
    if cmap is not None:
        class_names = cmap.labels  # every class below is a dataset label
    unmatched = 0
    if args.ground_truth:
        for row in rows:
            row["gt_boxes"] = []
        truth = ground_truth.load(args.ground_truth, class_names)
        matched = ground_truth.attach_to_rows(rows, truth, class_names)
        unmatched = len(rows) - matched
        if not matched:
            raise OptionsError(f"--ground_truth {args.ground_truth} knows none of the {len(rows)} annotated images "
                               f"(matched by image id, file name and file stem; e.g. {rows[0]['image_id']!r})")
        if unmatched:
            logger.warning("%d of %d annotated images have no ground truth in %s", unmatched, len(rows),
                           args.ground_truth)
    if cmap is not None:
        to_labels(rows, cmap, summary["model"]["class_names"])
    unknown = sum(1 for r in rows for g in r["gt_boxes"] if g["class_id"] < 0)
    if unknown:
        logger.warning("%d true boxes name classes the model does not know; they are left out", unknown)
        for r in rows:
            r["gt_boxes"] = [g for g in r["gt_boxes"] if g["class_id"] >= 0]
    try:
        # Each pass is one loop over the rows: counted() shows it moving, with a total and an ETA, on long runs.
        ev = metrics.evaluate_rows(progress.counted(rows, len(rows), "evaluate: rows scored"), class_names)
        ev["detection"] = detection.detection_scores(progress.counted(rows, len(rows), "evaluate: rows matched"))
        for kind in metrics.BASELINES:
            ev["baselines"][kind]["detection"] = detection.detection_scores(progress.counted(
                detection.baseline_rows(rows, kind), len(rows), f"evaluate: {kind} baseline rows matched"))
    except ValueError as exc:
        hint = ""
        if "nothing to evaluate" in str(exc) and not args.ground_truth:
            hint = "; the pictures carried no boxes: pass their truth with --ground_truth VOC_DIR | COCO.json | " \
                   "'shards/*.tfrecord'"
        raise OptionsError(f"{exc}{hint}") from None
    ev["annotations"] = args.annotations
    ev["ground_truth"] = args.ground_truth or "carried in the annotation rows"
    ev["rows"], ev["rows_without_ground_truth"], ev["unknown_class_boxes"] = len(rows), unmatched, unknown
    ev["label_options"] = summary.get("options", {})
    out = args.output or FileSystems.join(args.annotations.rstrip("/"), "evaluation.json")
    with FileSystems.create(out) as f:
        f.write(json.dumps(_json_keys(ev), indent=2).encode())
    ev["written"] = out
    return ev


def render(ev: dict) -> str:
    """What evaluate prints: the table, a plain note when GT-known cannot differ from Top-1, and the file."""
    text = _table(ev)
    note = same_as_top1_note(ev)
    return text + (f"\n{note}" if note else "") + f"\n\nwritten: {ev['written']}"


def same_as_top1_note(ev: dict) -> str:
    """Why GT-known Loc equals Top-1 Loc, when it does because only predicted classes were boxed."""
    opts = ev.get("label_options") or {}
    if opts.get("classes") == "predicted" and ev["gt_known"] == ev["top1_loc"]:
        return ("note: GT-known Loc equals Top-1 Loc here because the run boxed only its predicted classes "
                f"(label --classes predicted, top_k {opts.get('top_k')}): an image whose true class was not predicted "
                "has no box of that class. Label with --classes both to measure localisation apart from "
                "classification.")
    return ""
