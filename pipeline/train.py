"""`weakloc train`: a GAP classifier from image-level labels only, streamed with tf.data, saved with its sidecar.

    weakloc train --input 'shards/train-*.tfrecord' --output models/digits.keras [--arch small] [--epochs 8]

Reads the same inputs as `weakloc label` (TFRecord image/class/label or /text, or class-per-folder images),
holds out a stable validation split (by a hash of each image id), stops early on the validation loss and writes
`MODEL.keras` plus `MODEL.json` (input size, scale, offset, class names, the training data fingerprint and the
validation accuracy) that `label` and `calibrate` read.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time


from weakloc.models import sidecar, train

from . import ground_truth, inputs
from .args import Parser
from .options import OptionsError, parse_size

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc train", description=__doc__.splitlines()[0])
    ap.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="TFRecord shards or image files (class-per-folder), as for `label`; repeatable")
    ap.add_argument("--output", required=True, help="where to write the model (.keras); its sidecar goes beside it")
    ap.add_argument("--arch", choices=train.ARCHES, default="small",
                    help="small: a CNN whose final map is 1/4 (or 1/2) of the input; others: keras.applications")
    ap.add_argument("--weights", choices=("imagenet", "none"), default="imagenet",
                    help="backbones: start from ImageNet weights (needs them downloaded) or from scratch")
    ap.add_argument("--input_size", help="H,W (default: 96,96 for small, 224,224 for backbones)")
    ap.add_argument("--width", type=int, default=8, help="small: channel unit (layers have 2, 3, 6, 6, 8 x width)")
    ap.add_argument("--dilation", type=int, default=1,
                    help="small: dilate the last two convolutions (d, 2d) for a wider view; blurs the CAMs")
    ap.add_argument("--final_stride", type=int, choices=(2, 4), default=4, help="small: input / final map size")
    ap.add_argument("--epochs", type=int, default=8, help="most epochs to train (early stopping may end sooner)")
    ap.add_argument("--batch_size", type=int, default=64, help="images per training step")
    ap.add_argument("--learning_rate", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--val_percent", type=float, default=10.0, help="share of images held out for validation")
    ap.add_argument("--patience", type=int, default=2, help="epochs without validation-loss progress before stopping")
    ap.add_argument("--flip_augment", action="store_true",
                    help="random horizontal flips (for photos; not for digits, whose mirror image is no digit)")
    ap.add_argument("--cache", action="store_true",
                    help="keep the decoded training images in memory after the first epoch (when they fit)")
    ap.add_argument("--shuffle_buffer", type=int, default=4096, help="images held for shuffling the stream")
    ap.add_argument("--labels", metavar="MANIFEST.csv|.jsonl",
                    help="image-level labels of image files: one `path,label[,label...]` per line (CSV) or "
                         '{"path": ..., "labels": [...]} (JSONL); paths relative to the manifest\'s folder')
    ap.add_argument("--ground_truth", action="append", metavar="VOC_DIR|COCO.json",
                    help="take each image file's labels from the object names of its true boxes; repeatable")
    ap.add_argument("--class_names", help="comma-separated names in output order (default: found in the data)")
    ap.add_argument("--labels_from_folder", choices=("auto", "yes", "no"), default="auto",
                    help="images: the parent folder names the label (auto: when the pattern's folder part has a wildcard)")
    ap.add_argument("--label_offset", type=int, default=0, help="subtract from integer labels to get class ids")
    ap.add_argument("--input_format", choices=("tfrecord", "images"), help="default: inferred from the pattern's extension")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffle")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    return ap


def make_dataset(source, *, input_size, scale, offset, label_offset, validation: bool, val_percent: float,
                 batch_size: int, shuffle_buffer: int = 0, flip: bool = False, cache: bool = False, seed: int = 0):
    """A tf.data pipeline streaming (x * scale + offset, first known label) from the inputs, one split of it."""
    import tensorflow as tf

    h, w = input_size

    def gen():
        for ex in inputs.iterate(source, input_size=input_size, label_offset=label_offset):
            known = [c for c in ex.label_ids if c >= 0]
            if known and inputs.in_validation(ex.image_id, val_percent) == validation:
                yield ex.pixels, known[0]

    ds = tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec((h, w, 3), tf.uint8), tf.TensorSpec((), tf.int64))
    )
    if cache:
        ds = ds.cache()
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def prep(x, y):
        x = tf.cast(x, tf.float32) * scale + offset
        if flip:
            x = tf.image.random_flip_left_right(x)
        return x, y

    return ds.batch(batch_size).map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        raise OptionsError(f"--output {args.output} exists; pass --overwrite to replace it")
    if not args.output.endswith((".keras", ".h5")):
        raise OptionsError(f"--output must end in .keras, got {args.output!r}")
    if not 0 < args.val_percent < 100:
        raise OptionsError(f"--val_percent must be within (0, 100), got {args.val_percent}")
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            raise OptionsError(f"--{name} must be >= 1, got {getattr(args, name)}")
    t0 = time.time()
    source = inputs.scan(args.input, input_format=args.input_format, labels_from_folder=args.labels_from_folder,
                         class_names=sidecar.class_names_from_flag(args.class_names), label_offset=args.label_offset,
                         manifest=ground_truth.load_manifest(args.labels) if args.labels else None,
                         ground_truth=ground_truth.load(args.ground_truth) if args.ground_truth else None)
    inputs.warn_folder_labels(source)
    logger.info("%d inputs in %d files, %d classes: %s", source.count, len(source.files), len(source.class_names),
                ", ".join(source.class_names))
    if len(source.class_names) < 2:
        raise OptionsError(f"need at least 2 classes to train a classifier, found {list(source.class_names)}")
    size = parse_size(args.input_size)
    if size is None:
        size = [96, 96] if args.arch == "small" else [224, 224]
        logger.warning("--input_size not given: using %d,%d", *size)
    size = tuple(size)
    n = len(source.class_names)
    if args.arch == "small":
        model = train.cam_cnn(size, n, width=args.width, final_stride=args.final_stride,
                              dilation=args.dilation, seed=args.seed)
        scale, offset = 1 / 255, 0.0
    else:
        model, scale, offset = train.backbone_gap(args.arch, size, n, seed=args.seed,
                                                  weights=None if args.weights == "none" else "imagenet")
    common = dict(input_size=size, scale=scale, offset=offset, label_offset=args.label_offset,
                  val_percent=args.val_percent, batch_size=args.batch_size, seed=args.seed)
    train_ds = make_dataset(source, validation=False, shuffle_buffer=args.shuffle_buffer, flip=args.flip_augment,
                            cache=args.cache, **common)
    val_ds = make_dataset(source, validation=True, cache=args.cache, **common)
    steps = math.ceil(source.count * (1 - args.val_percent / 100) / args.batch_size)
    # A progress bar on a terminal, one line per epoch in logs.
    verbose = 1 if sys.stdout.isatty() else 2
    fit = train.fit_datasets(model, train_ds, val_ds, epochs=args.epochs, patience=args.patience,
                             learning_rate=args.learning_rate, verbose=verbose, steps_per_epoch=steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.save(args.output)
    seconds = round(time.time() - t0, 1)
    meta = dict(
        sidecar.Preprocessing(size, scale, offset, source.class_names).to_json(),
        training={
            "inputs": list(args.input),
            "images": source.count,
            "data_fingerprint": source.fingerprint,
            "arch": args.arch,
            "dilation": args.dilation if args.arch == "small" else None,
            "weights": args.weights if args.arch != "small" else None,
            "final_feature_map": [int(d) for d in model.get_layer("gap").input.shape[1:3]],
            "epochs_run": fit["epochs"],
            "val_percent": args.val_percent,
            "val_accuracy": fit["val_accuracy"],
            "history": fit["history"],
            "seconds": seconds,
        },
    )
    with open(sidecar.sidecar_path(args.output), "w") as f:
        json.dump(meta, f, indent=2)
    meta["written"] = {"model": args.output, "sidecar": sidecar.sidecar_path(args.output)}
    return meta


def render(meta: dict) -> str:
    """What train prints once the model is saved."""
    t = meta["training"]
    return (f"model:               {meta['written']['model']}\n"
            f"sidecar:             {meta['written']['sidecar']}\n"
            f"validation accuracy: {t['val_accuracy']:.2%} after {t['epochs_run']} epochs\n"
            f"wall time:           {t['seconds']} s")
