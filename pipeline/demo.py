"""`weakloc demo`: the whole weak-supervision loop on an embedded synthetic dataset, offline, in minutes.

1. make a shapes dataset (image-level labels only for training; true boxes kept aside),
2. train a small GAP CNN on the labels alone and save it with its sidecar,
3. choose the CAM threshold (contrast CAMs) and fit the box refinement on 40 boxed calibration images, and save
   both beside the model,
4. write held-out images as TFRecord shards and run the Beam labeling pipeline on them,
5. read the Parquet back and score the boxes against the held-out truth.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

from weakloc.models import boxes as boxlib
from weakloc.models import files, metrics, refine, sidecar, synthetic, train
from weakloc.models.cam import CamModel
from weakloc.models.thresholds import Thresholds

from .args import Parser
from .calibrate import edge_warnings

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc demo", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="weakloc-demo", help="working directory (replaced if it holds a demo)")
    ap.add_argument("--train_images", type=int, default=2400, help="synthetic images to train on (image-level labels only)")
    ap.add_argument("--eval_images", type=int, default=400, help="held-out images labelled and scored")
    ap.add_argument("--calibration_images", type=int, default=40, help="boxed images the threshold and refinement are chosen on")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs")
    ap.add_argument("--image_size", type=int, default=64, help="side of the square images, in pixels")
    ap.add_argument("--shards", type=int, default=2, help="TFRecord shards of the held-out images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the model")
    return ap


def calibrate(model: CamModel, data: synthetic.ShapesSet) -> tuple[metrics.Sweep, Thresholds]:
    """Sweep tau on boxed images using the CAM of each image's true class, then fit the box refinement at the
    chosen tau; returns the sweep and the thresholds document `label` reads."""
    out = model(data.images, extra=data.labels.reshape(-1, 1))
    k = out.top_classes.shape[1]
    normed, valid = boxlib.normalize_cams(out.column(k))
    truths = [b[None] for b in data.boxes]
    sweep = metrics.sweep_thresholds(normed, truths, valid=valid)
    doc = Thresholds(default=sweep.best_threshold, cam_contrast=model.contrast,
                     calibration={"images": len(data.images), "max_box_acc_v2": sweep.max_box_acc_v2})
    try:
        refiner, report = refine.fit(normed, sweep.best_threshold, truths, valid=valid)
    except refine.RefineError as exc:  # e.g. fewer boxed images than a refinement needs
        logger.info("      no box refinement: %s", exc)
        return sweep, doc
    if report.helps:  # cross-validated on these images, as `weakloc calibrate --refine_boxes` decides
        doc = dataclasses.replace(doc, box_refine=refiner)
    return sweep, doc


def run(argv=None) -> dict:
    ap = parser()
    args, beam_args = ap.parse_known_args(argv)
    from . import label, options, results

    # The flags passed on to `weakloc label` are checked now, not after two minutes of training.
    label_parser = label.parser()
    _, unknown = label_parser.parse_known_args(["--input", "-", "--model", "-", "--output", "-", *beam_args])
    options.check_beam_args(unknown, known=[*ap.option_strings(), *label_parser.option_strings()])

    t0 = time.time()
    out_dir = os.path.abspath(args.output)
    size = (args.image_size, args.image_size)
    names = synthetic.SHAPES
    logger.info("[1/5] making synthetic shapes: %d train, %d calibration, %d held-out images (%dx%d)",
                args.train_images, args.calibration_images, args.eval_images, *size)
    train_set = synthetic.make_shapes(args.train_images, size=size[0], seed=args.seed)
    calib_set = synthetic.make_shapes(args.calibration_images, size=size[0], seed=args.seed + 1)
    eval_set = synthetic.make_shapes(args.eval_images, size=size[0], seed=args.seed + 2)

    logger.info("[2/5] training a small GAP CNN on image-level labels only (%d epochs)", args.epochs)
    prep = sidecar.Preprocessing(size, 1.0 / 255.0, 0.0, names)
    keras_model = train.small_gap_cnn(size, len(names), seed=args.seed)
    fit = train.fit_in_memory(keras_model, train_set.images, train_set.labels, prep=prep, epochs=args.epochs,
                              seed=args.seed)
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    model_path = os.path.join(model_dir, "shapes.keras")
    keras_model.save(model_path)
    meta = dict(prep.to_json(), dataset=f"synthetic shapes seed={args.seed} n={args.train_images}", **fit)
    with open(sidecar.sidecar_path(model_path), "w") as f:
        json.dump(meta, f, indent=2)

    logger.info("%s", "[3/5] choosing the CAM threshold and box refinement on the boxed calibration images")
    cam_model = CamModel(keras_model, input_size=size, scale=prep.scale, offset=prep.offset, contrast=True)
    sweep, thresholds = calibrate(cam_model, calib_set)
    edge_warnings(thresholds)  # logged: a tau at an end of the sweep is written, never silently
    with open(os.path.join(model_dir, "shapes.thresholds.json"), "w") as f:
        json.dump(thresholds.to_json(), f, indent=2)

    logger.info("%s", "[4/5] labeling the held-out TFRecord shards with the Beam pipeline")
    shard_dir = os.path.join(out_dir, "shards")
    files.write_tfrecord_shards(synthetic.examples(eval_set, "heldout"), files.shard_paths(shard_dir, "heldout", args.shards))
    labels_dir = os.path.join(out_dir, "labels")
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=FnApiRunner", *beam_args]  # the local runner, with no Prism download attempt
    summary = label.run(
        ["--input", os.path.join(shard_dir, "heldout-*.tfrecord"), "--model", model_path, "--output", labels_dir,
         # --classes both: also box each image's own label, so a misclassified image still gets a box of its true
         # class and "GT-known Loc" is not silently Top-1 Loc.
         "--classes", "both", "--overwrite", *beam_args]
    )

    logger.info("%s", "[5/5] scoring the boxes against the held-out truth")
    ev = metrics.evaluate_rows(results.read_table(labels_dir, "annotations").to_pylist(), names)
    score = {"images": ev["images"], "top1": ev["top1"], "gt_known_loc_50": ev["gt_known"][0.5],
             "top1_loc_50": ev["top1_loc"][0.5], "full_image_baseline_50": ev["baselines"]["full_image"]["gt_known"][0.5]}
    counts = summary.get("counts", {})
    result = {
        "annotations": os.path.join(labels_dir, "annotations-*.parquet"),
        "summary": os.path.join(labels_dir, "summary.json"),
        "threshold": sweep.best_threshold,
        "box_refine": thresholds.box_refine is not None,
        "calibration_max_box_acc_v2": round(sweep.max_box_acc_v2, 1),
        "validation_accuracy": fit["val_accuracy"],
        **score,
        "read": counts.get("read"),
        "annotated": counts.get("annotated"),
        "calibration_images": args.calibration_images,
        "failed": counts.get("failed"),
        "seconds": round(time.time() - t0, 1),
    }
    return result


def render(result: dict) -> str:
    """What the demo prints at the end (the figures the README quotes)."""
    return (
        f"\nParquet annotations: {result['annotations']}\n"
        f"Run summary:         {result['summary']}\n"
        f"Images labelled:     {result['annotated']} of {result['read']} read ({result['failed']} failed)\n"
        f"Top-1 accuracy:      {result['top1']:.1%}\n"
        f"Boxes with IoU>=0.5: {result['gt_known_loc_50']:.1%} (box of the true class; "
        f"{result['top1_loc_50']:.1%} also classified right)\n"
        f"Full-image baseline: {result['full_image_baseline_50']:.1%} at IoU>=0.5\n"
        f"CAM threshold:       {result['threshold']:.2f} (contrast CAMs), chosen on {result['calibration_images']} "
        f"boxed images; box refinement {'fitted there too' if result['box_refine'] else 'not kept (no gain)'}\n"
        f"Wall time:           {result['seconds']} s"
    )
