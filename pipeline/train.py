"""`weakloc train`: a GAP classifier from image-level labels only, streamed with tf.data, saved with its sidecar.

    weakloc train --input 'shards/train-*.tfrecord' --output models/digits.keras [--arch small] [--epochs 30]
    weakloc train --input 'shards/train-*.tfrecord' --output models/photos.keras --arch mobilenetv2 \
        --weights ../shared/models/mobilenet_v2_imagenet.keras [--feature_layer block_13_expand_relu]

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


from apache_beam.io.filesystems import FileSystems

from weakloc.models import backbones, feature_cache, sidecar, train
from weakloc.models import files
from weakloc.models.files import fetch_to_local

from . import ground_truth, inputs
from .args import Parser
from .options import OptionsError, parse_size

logger = logging.getLogger(__name__)


_BACKBONE_DEFAULTS = dict(head_epochs=3, epochs=10, learning_rate=1e-3)
_SMALL_DEFAULTS = dict(epochs=30, learning_rate=2e-3)
LOW_VAL_ACCURACY = 0.7  # below this a CAM's boxes follow a classifier that is often wrong: say so


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc train", description=__doc__.splitlines()[0])
    ap.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="TFRecord shards or image files (class-per-folder), as for `label`; repeatable")
    ap.add_argument("--output", required=True, help="where to write the model (.keras); its sidecar goes beside it")
    ap.add_argument("--arch", choices=train.ARCHES, default="small",
                    help="small: a CNN whose final map is 1/4 (or 1/2) of the input; others: a pretrained backbone")
    ap.add_argument("--weights", default="imagenet", metavar="imagenet|none|FILE",
                    help="backbones: ImageNet weights via Keras's download, random (none), or a local/gs:///s3:// "
                         ".keras/.h5 classifier or bare backbone, or a .weights.h5 of --arch (default: imagenet)")
    ap.add_argument("--feature_layer",
                    help="backbones: cut at this layer's output instead of the GAP input (e.g. MobileNetV2 "
                         "block_13_expand_relu: a 14x14 map at 224)")
    ap.add_argument("--last_stride", type=int, choices=(1, 2), default=2,
                    help="backbones: 1 runs the last stride-2 stage at stride 1 with dilated convolutions after it "
                         "(a map twice as fine, about 2.5x the forward time of that stage)")
    ap.add_argument("--no_feature_cache", dest="feature_cache", action="store_false",
                    help="backbones: run the frozen lower layers every epoch instead of once (by default their "
                         "outputs are cached, with the mirror images under --flip_augment, and only the "
                         "unfrozen top and the head train on them)")
    ap.add_argument("--unfreeze_from", help="backbones: first layer unfrozen in phase 2 (default: the last stage)")
    ap.add_argument("--head_epochs", type=int, default=_BACKBONE_DEFAULTS["head_epochs"],
                    help="backbones: phase 1 epochs, the new head alone on the frozen backbone (default: %(default)s)")
    ap.add_argument("--fine_tune_learning_rate", type=float,
                    help="backbones: phase 2 learning rate (default: --learning_rate / 10)")
    ap.add_argument("--input_size", help="H,W (default: 96,96 for small; the file's own, else 224,224 for backbones)")
    ap.add_argument("--width", type=int, default=8, help="small: channel unit (layers have 2, 3, 6, 6, 8 x width)")
    ap.add_argument("--dilation", type=int, default=1,
                    help="small: dilate the last two convolutions (d, 2d) for a wider view; blurs the CAMs")
    ap.add_argument("--final_stride", type=int, choices=(2, 4), default=4, help="small: input / final map size")
    ap.add_argument("--epochs", type=int,
                    help=f"epoch budget (backbones: of phase 2); default {_SMALL_DEFAULTS['epochs']} for small, "
                         f"{_BACKBONE_DEFAULTS['epochs']} for backbones")
    ap.add_argument("--batch_size", type=int, default=32, help="images per training step")
    ap.add_argument("--learning_rate", type=float,
                    help=f"default {_SMALL_DEFAULTS['learning_rate']} for small, "
                         f"{_BACKBONE_DEFAULTS['learning_rate']} for a backbone's head")
    ap.add_argument("--val_percent", type=float, default=10.0, help="share of images held out for validation")
    ap.add_argument("--patience", type=int, default=5,
                    help="epochs without validation-loss progress before stopping (default: %(default)s)")
    ap.add_argument("--multi_label", choices=train.LABEL_MODES, default="softmax",
                    help="images with several labels: softmax over targets split evenly between them (default), "
                         "sigmoid per class, or first (train on the first label only)")
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
                 batch_size: int, label_mode: str, shuffle_buffer: int = 0, flip: bool = False, cache: bool = False,
                 seed: int = 0):
    """A tf.data pipeline streaming (x * scale + offset, train.targets of the known labels), one split of it."""
    import tensorflow as tf

    h, w = input_size
    n = len(source.class_names)

    def gen():
        for ex in inputs.iterate(source, input_size=input_size, label_offset=label_offset):
            known = [c for c in ex.label_ids if c >= 0]
            if known and inputs.in_validation(ex.image_id, val_percent) == validation:
                yield ex.pixels, train.targets(known, n, label_mode)

    ds = tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec((h, w, 3), tf.uint8), tf.TensorSpec((n,), tf.float32))
    )
    if cache:
        ds = ds.cache()
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    if flip:
        # A coin per picture from a seeded stream, drawn anew each epoch: the same flips on every run. (A random
        # op inside the parallel map below drew in thread order, so two runs trained on different pictures and
        # the README's figures moved from run to run.)
        coins = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).map(lambda r: r % 2 == 1)
    else:
        coins = tf.data.Dataset.from_tensors(False).repeat()
    ds = tf.data.Dataset.zip(ds, coins)

    def prep(xy, mirror):
        x = tf.cast(xy[0], tf.float32) * scale + offset
        return tf.where(mirror[:, None, None, None], tf.reverse(x, axis=[2]), x), xy[1]

    return ds.batch(batch_size).map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def label_counts(source, *, label_offset: int, val_percent: float) -> dict:
    """Per split, images per class and how many carry several labels (labels only: no pixel is decoded)."""
    out = {split: {"images": 0, "multi_label": 0, "per_class": dict.fromkeys(source.class_names, 0)}
           for split in ("train", "validation")}
    for ex in inputs.iterate(source, label_offset=label_offset):
        known = sorted(set(c for c in ex.label_ids if c >= 0))
        if not known:
            continue
        split = out["validation" if inputs.in_validation(ex.image_id, val_percent) else "train"]
        split["images"] += 1
        split["multi_label"] += len(known) > 1
        for c in known:
            split["per_class"][source.class_names[c]] += 1
    return out


def _counts_table(counts: dict) -> str:
    names = list(counts["train"]["per_class"])
    width = max(len(n) for n in names + ["class"])
    lines = [f"{'class':{width}s}  train  validation"]
    lines += [f"{n:{width}s}  {counts['train']['per_class'][n]:5d}  {counts['validation']['per_class'][n]:10d}"
              for n in names]
    lines.append(f"{'images':{width}s}  {counts['train']['images']:5d}  {counts['validation']['images']:10d}"
                 f"   ({counts['train']['multi_label'] + counts['validation']['multi_label']} with several labels)")
    return "\n".join(lines)


def _file_sidecar(path: str) -> dict | None:
    """The sidecar beside a backbone file (`m.keras` -> `m.json`; `m.weights.h5` -> `m.weights.json` or `m.json`)."""
    candidates = [sidecar.sidecar_path(path)]
    if path.endswith(".weights.h5"):
        candidates.append(path[: -len(".weights.h5")] + ".json")
    for cand in candidates:
        if FileSystems.exists(cand):
            try:
                return sidecar.parse_sidecar(files.read_json(cand, "backbone sidecar"), where=cand)
            except (files.FileFormatError, sidecar.SidecarError) as exc:
                raise OptionsError(str(exc)) from None
    return None


def build_backbone_model(args, size, n: int, activation: str):
    """(Keras model, backbone Backbone, scale, offset) for --arch other than small."""
    default_scale, default_offset = backbones.APPLICATIONS[args.arch][1:]
    if args.weights in ("imagenet", "none"):
        bb = train.imagenet_backbone(args.arch, size or (224, 224),
                                     weights=None if args.weights == "none" else "imagenet")
        if args.feature_layer:
            bb.model, bb.feature_layer = backbones.cut(bb.model, args.feature_layer)
            bb.provenance.update(feature_layer=bb.feature_layer)
    else:
        if not args.weights.endswith((".keras", ".h5")):
            raise OptionsError(f"--weights must be imagenet, none or a .keras/.h5/.weights.h5 file, got "
                               f"{args.weights!r}")
        if not FileSystems.exists(args.weights):
            raise OptionsError(f"--weights {args.weights} does not exist")
        side = _file_sidecar(args.weights)
        try:
            bb = backbones.load(args.weights, fetch_to_local(args.weights), args.arch,
                                feature_layer=args.feature_layer, sidecar=side)
        except backbones.BackboneError as exc:
            raise OptionsError(f"--weights {args.weights}: {exc}") from None
        if bb.scale is None:
            logger.warning("no sidecar beside %s: assuming %s's preprocessing, x * %.6g + %g", args.weights,
                           args.arch, default_scale, default_offset)
    own = tuple(bb.model.inputs[0].shape[1:3])
    target = tuple(size) if size else (own if all(own) else (224, 224))
    if target != own or args.last_stride == 1:
        bb.model = backbones.rebuild(bb.model, input_size=target if target != own else None,
                                     last_stride_arch=args.arch if args.last_stride == 1 else None)
    bb.provenance.update(feature_map=[int(d) for d in bb.model.outputs[0].shape[1:]], last_stride=args.last_stride)
    scale = bb.scale if bb.scale is not None else default_scale
    offset = bb.offset if bb.offset is not None else default_offset
    caffe = args.arch == "resnet50" and bb.scale is None
    model = train.gap_classifier(bb.model, n, arch=args.arch, activation=activation, caffe=caffe, seed=args.seed)
    return model, bb, target, scale, offset


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    _check_args(args)
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
    counts = label_counts(source, label_offset=args.label_offset, val_percent=args.val_percent)
    logger.info("training on:\n%s", _counts_table(counts))
    if counts["validation"]["images"] == 0:
        raise OptionsError(f"--val_percent {args.val_percent} leaves no validation image; raise it")
    model, backbone, size, scale, offset = _build_model(args, len(source.class_names))
    fit = _fit(args, model, backbone, source, counts, size, scale, offset)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.save(args.output)
    meta = dict(
        sidecar.Preprocessing(tuple(size), scale, offset, source.class_names).to_json(),
        training={
            "inputs": list(args.input),
            "images": source.count,
            "data_fingerprint": source.fingerprint,
            "label_counts": counts,
            "multi_label": args.multi_label,
            "arch": args.arch,
            "dilation": args.dilation if args.arch == "small" else None,
            "weights": args.weights if args.arch != "small" else None,
            "backbone": backbone.provenance if backbone is not None else None,
            "final_feature_map": [int(d) for d in model.get_layer("gap").input.shape[1:3]],
            "epochs_run": fit["epochs"],
            "feature_cache": fit.get("feature_cache", False),
            "phases": fit.get("phases"),
            "early_stopped": fit["early_stopped"],
            "val_percent": args.val_percent,
            "val_accuracy": fit["val_accuracy"],
            "history": fit["history"],
            "seconds": round(time.time() - t0, 1),
        },
    )
    with open(sidecar.sidecar_path(args.output), "w") as f:
        json.dump(meta, f, indent=2)
    meta["written"] = {"model": args.output, "sidecar": sidecar.sidecar_path(args.output)}
    return meta


def _check_args(args) -> None:
    """What the flags alone can tell; fills the architecture's epoch and learning-rate defaults."""
    if os.path.exists(args.output) and not args.overwrite:
        raise OptionsError(f"--output {args.output} exists; pass --overwrite to replace it")
    if not args.output.endswith((".keras", ".h5")):
        raise OptionsError(f"--output must end in .keras, got {args.output!r}")
    if not 0 < args.val_percent < 100:
        raise OptionsError(f"--val_percent must be within (0, 100), got {args.val_percent}")
    defaults = _SMALL_DEFAULTS if args.arch == "small" else _BACKBONE_DEFAULTS
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.learning_rate = defaults["learning_rate"] if args.learning_rate is None else args.learning_rate
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            raise OptionsError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.arch == "small" and (args.weights != "imagenet" or args.feature_layer or args.last_stride != 2):
        raise OptionsError("--weights, --feature_layer and --last_stride are for pretrained backbones, not --arch small")


def _build_model(args, n: int):
    """(Keras model, backbone or None, input size, scale, offset) of --arch."""
    size = parse_size(args.input_size)
    if size is None and args.arch == "small":
        size = [96, 96]
        logger.warning("--input_size not given: using %d,%d", *size)
    activation = "sigmoid" if args.multi_label == "sigmoid" else "softmax"
    if args.arch == "small":
        size = tuple(size)
        model = train.cam_cnn(size, n, width=args.width, final_stride=args.final_stride,
                              dilation=args.dilation, seed=args.seed, activation=activation)
        return model, None, size, 1 / 255, 0.0
    try:
        model, backbone, size, scale, offset = build_backbone_model(args, size, n, activation)
    except backbones.BackboneError as exc:
        raise OptionsError(str(exc)) from None
    return model, backbone, size, scale, offset


def _fit(args, model, backbone, source, counts, size, scale, offset) -> dict:
    """Train (the two-phase fine-tune for a pretrained backbone), warning when it stops early or lands low."""
    common = dict(input_size=size, scale=scale, offset=offset, label_offset=args.label_offset,
                  val_percent=args.val_percent, batch_size=args.batch_size, seed=args.seed,
                  label_mode=args.multi_label)
    train_ds = make_dataset(source, validation=False, shuffle_buffer=args.shuffle_buffer, flip=args.flip_augment,
                            cache=args.cache, **common)
    val_ds = make_dataset(source, validation=True, cache=args.cache, **common)
    steps = math.ceil(counts["train"]["images"] / args.batch_size)
    # A progress bar on a terminal, one line per epoch in logs.
    verbose = 1 if sys.stdout.isatty() else 2
    fit_args = dict(patience=args.patience, verbose=verbose, steps_per_epoch=steps, label_mode=args.multi_label)
    if backbone is not None and args.weights != "none":
        try:
            top = backbones.top_layers(backbone.model, args.arch, args.unfreeze_from)
        except backbones.BackboneError as exc:
            raise OptionsError(str(exc)) from None
        tune = dict(head_epochs=args.head_epochs, epochs=args.epochs, learning_rate=args.learning_rate,
                    fine_tune_learning_rate=args.fine_tune_learning_rate or args.learning_rate / 10, **fit_args)
        split = _feature_split(args, model, top)
        if split is not None:
            trunk, top_model = split
            # The trunk once over the images (unshuffled, unflipped: the cache holds both orientations itself).
            plain = dict(common, batch_size=max(args.batch_size, 64))
            t_cache = time.time()
            x_tr, y_tr = feature_cache.cache_features(
                trunk, make_dataset(source, validation=False, **plain), flip=args.flip_augment)
            x_val, y_val = feature_cache.cache_features(trunk, make_dataset(source, validation=True, **plain))
            logger.info("feature cache: %d training and %d validation tensors of %s from %s (%.1f MB) in %.1f s",
                        len(x_tr), len(x_val), tuple(x_tr.shape[1:]), top[0].name,
                        (x_tr.nbytes + x_val.nbytes) / 1e6, time.time() - t_cache)
            tune["steps_per_epoch"] = math.ceil(len(x_tr) / args.batch_size)
            fit = train.fine_tune(
                top_model, backbone.model, top,
                feature_cache.feature_dataset(x_tr, y_tr, batch_size=args.batch_size, shuffle=True, seed=args.seed),
                feature_cache.feature_dataset(x_val, y_val, batch_size=args.batch_size, shuffle=False), **tune)
            fit["feature_cache"] = True
        else:
            fit = train.fine_tune(model, backbone.model, top, train_ds, val_ds, **tune)
    else:
        fit = train.fit_datasets(model, train_ds, val_ds, epochs=args.epochs, learning_rate=args.learning_rate,
                                 **fit_args)
    if fit["early_stopped"]:
        logger.warning("training stopped early: no validation-loss progress for %d epochs; kept epoch %d "
                       "(validation accuracy %.1f%%); raise --patience to train longer", args.patience,
                       fit["best_epoch"], 100 * fit["val_accuracy"])
    if fit["val_accuracy"] is not None and fit["val_accuracy"] < LOW_VAL_ACCURACY:
        logger.warning("validation accuracy is low (%.1f%% < %.0f%%): boxes of misclassified images are boxes of "
                       "the wrong class; train longer, on more images, or from a pretrained backbone (--weights)",
                       100 * fit["val_accuracy"], 100 * LOW_VAL_ACCURACY)
    return fit


def _feature_split(args, model, top):
    """(trunk, top model) to train on cached features, or None: --no_feature_cache, nothing to unfreeze, or a
    graph the cut cannot serve (then a warning, and the frozen layers run every epoch as before)."""
    if not args.feature_cache or not top:
        return None
    try:
        return feature_cache.split(model, top[0].name)
    except ValueError as exc:  # FeatureCacheError, or a layer inside a nested backbone (ResNet's caffe input)
        logger.warning("not caching frozen features (%s); the frozen layers run every epoch",
                       str(exc).splitlines()[0][:200])
        return None


def render(meta: dict) -> str:
    """What train prints once the model is saved."""
    t = meta["training"]
    return (f"{_counts_table(t['label_counts'])}\n"
            f"model:               {meta['written']['model']}\n"
            f"sidecar:             {meta['written']['sidecar']}\n"
            f"validation accuracy: {t['val_accuracy']:.2%} after {t['epochs_run']} epochs\n"
            f"wall time:           {t['seconds']} s")
