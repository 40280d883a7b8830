"""`weakloc datasets`: benchmark and demo datasets as TFRecord shards with image-level labels and true boxes.

    weakloc datasets cluttered-mnist --idx_dir ../shared/data/mnist --output data/cmnist
    weakloc datasets shapes --output data/shapes
    weakloc datasets images --input 'photos/*.jpg' [--ground_truth VOC_DIR|COCO.json|TFRECORDS] --output data/mine

cluttered-mnist (see models/mnist.py) writes train-*, calib-* and eval-* shards. Digits 0-7999 of the MNIST test
set feed training and calibration, 8000-9999 evaluation, so no source digit (nor clutter fragment) is shared
between the canvases a model learns or calibrates on and those it is scored on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from weakloc.models import files, mnist, synthetic

from .options import OptionsError
from .args import Parser, ground_truth_flag

logger = logging.getLogger(__name__)

SPLIT_AT = 8000


def parser() -> argparse.ArgumentParser:
    ap = Parser("weakloc datasets", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    cm = sub.add_parser("cluttered-mnist", help="the cluttered MNIST benchmark (96x96 canvases)")
    cm.add_argument("--idx_dir", help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                                      "(default: download through keras.datasets, which needs the internet)")
    cm.add_argument("--output", required=True, help="folder for the train-*, calib-* and eval-* shards")
    cm.add_argument("--train", type=int, default=16000, help="training canvases")
    cm.add_argument("--eval", type=int, default=2000, help="evaluation canvases")
    cm.add_argument("--calib_per_class", type=int, default=10, help="calibration canvases per digit")
    cm.add_argument("--size", type=int, default=96, help="canvas side, in pixels")
    cm.add_argument("--shards", type=int, default=4, help="shards per split (calib: 1)")
    cm.add_argument("--seed", type=int, default=0, help="seed of the canvases")
    ph = sub.add_parser("photos", help="the shared real photos (fruit, kangaroo, raccoon) with VOC boxes")
    ph.add_argument("--root", required=True, help="the photos folder (fruit/, kangaroo/, raccoon/)")
    ph.add_argument("--output", required=True, help="folder for the train, calib and test shards")
    ph.add_argument("--calib_per_class", type=int, default=5, help="boxed training images set aside per class")
    ph.add_argument("--test_percent", type=float, default=20.0, help="kangaroo/raccoon images held out for test")
    ph.add_argument("--seed", type=int, default=0, help="seed of the kangaroo/raccoon split")
    im = sub.add_parser("images", help="your own pictures with true boxes (VOC XML, COCO JSON or TFRecords)",
                        parents=[ground_truth_flag("true boxes (and image-level labels: their object names)",
                                                   "VOC XML beside the pictures")])
    im.add_argument("--input", action="append", required=True, metavar="PATTERN",
                    help="picture files (.jpg, .jpeg, .png), e.g. 'photos/*.jpg'; repeatable")
    im.add_argument("--output", required=True, help="folder for the train, calib and test shards")
    im.add_argument("--calib_per_class", type=int, default=5, help="boxed training images set aside per class")
    im.add_argument("--test_percent", type=float, default=20.0, help="pictures held out for test")
    im.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    sh = sub.add_parser("shapes", help="the synthetic shapes set of `weakloc demo`")
    sh.add_argument("--output", required=True, help="folder for the train, calib and eval shards")
    sh.add_argument("--train", type=int, default=2400, help="training images")
    sh.add_argument("--eval", type=int, default=400, help="evaluation images")
    sh.add_argument("--calib", type=int, default=40, help="calibration images")
    sh.add_argument("--size", type=int, default=64, help="image side, in pixels")
    sh.add_argument("--shards", type=int, default=2, help="shards per split (calib: 1)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the images")
    return ap


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if os.path.isdir(args.output) and any(n.endswith(".tfrecord") for n in os.listdir(args.output)):
        raise OptionsError(f"--output {args.output} already holds TFRecord shards; choose a new directory")
    if args.dataset == "cluttered-mnist":
        try:
            digits, labels = mnist.load_idx_dir(args.idx_dir) if args.idx_dir else mnist.load_keras_mnist()
        except mnist.MnistError as exc:
            raise OptionsError(str(exc)) from None
        if len(digits) <= SPLIT_AT:
            raise OptionsError(f"expected the 10,000-digit MNIST test set, found {len(digits)} digits")
        pools = {"train": (0, SPLIT_AT), "calib": (0, SPLIT_AT), "eval": (SPLIT_AT, len(digits))}
        sets = {
            "train": dict(n=args.train, seed=args.seed),
            "calib": dict(n=0, per_class=args.calib_per_class, seed=args.seed + 1),
            "eval": dict(n=args.eval, seed=args.seed + 2),
        }
        made = {}
        for split, kw in sets.items():
            lo, hi = pools[split]
            data, picks = mnist.make_cluttered(digits[lo:hi], labels[lo:hi], size=args.size, **kw)
            shards = args.shards if split != "calib" else 1
            made[split] = {"images": len(data.labels), "digits": [lo, hi],
                           "files": _write_split(data, args.output, shards, split)}
            logger.info("%s: %d canvases from digits %d-%d", split, len(data.labels), lo, hi - 1)
    elif args.dataset == "photos":
        made = photos(args)
    elif args.dataset == "images":
        made = images(args)
    else:
        made = {}
        for split, n, seed in (("train", args.train, args.seed), ("calib", args.calib, args.seed + 1),
                               ("eval", args.eval, args.seed + 2)):
            data = synthetic.make_shapes(n, size=args.size, seed=seed)
            made[split] = {"images": n, "files": _write_split(data, args.output, args.shards if split != "calib"
                                                               else 1, split)}
    os.makedirs(args.output, exist_ok=True)
    doc = {"dataset": args.dataset, "options": vars(args), "splits": made}
    with open(os.path.join(args.output, "dataset.json"), "w") as f:
        json.dump(doc, f, indent=2)
    return doc


def _write_split(data, directory: str, shards: int, split: str) -> list[str]:
    """A ShapesSet (or cluttered-MNIST set) as `split-*.tfrecord` shards; returns their paths."""
    paths = files.shard_paths(directory, split, shards)
    files.write_tfrecord_shards(synthetic.examples(data, split), paths)
    return paths


def render(doc: dict) -> str:
    """One line per split: images and where its shards are."""
    out = doc["options"]["output"]
    return "\n".join(f"{split}: {info['images']} images" if not info["files"] else
                     f"{split:6s} {info['images']:6d} images  {os.path.join(out, split)}-*.tfrecord"
                     for split, info in doc["splits"].items())


def _pictures(folder: str) -> list[str]:
    return [os.path.join(folder, fn) for fn in sorted(os.listdir(folder)) if fn.lower().endswith(PICTURE_EXTS)]


PICTURE_EXTS = (".jpg", ".jpeg", ".png")
# EXIF orientation -> its inverse (the others are their own): seen-frame boxes back to the stored grid.
_INVERSE_ORIENTATION = {6: 8, 8: 6}


def _held_out(items: list, percent: float, rng) -> tuple[list, list]:
    """(train, test) by a seeded shuffle, `percent` of the items to test."""
    order = rng.permutation(len(items))
    n_test = int(round(len(items) * percent / 100))
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


def photos(args) -> dict:
    """Fruit train/test as given; kangaroo and raccoon split by a seeded shuffle, their VOC folders beside."""
    import numpy as np

    from . import ground_truth

    root = args.root
    expected = [os.path.join(root, *parts) for parts in (("fruit", "train"), ("fruit", "test"), ("kangaroo", "images"),
                                                          ("kangaroo", "annots"), ("raccoon", "images"),
                                                          ("raccoon", "annotations"))]
    missing = [p for p in expected if not os.path.isdir(p)]
    if missing:
        raise OptionsError(f"--root {root} is not the photos folder: expected fruit/train, fruit/test, "
                           f"kangaroo/images+annots and raccoon/images+annotations inside it, missing "
                           f"{', '.join(os.path.relpath(p, root) for p in missing)}")
    splits = {"train": [], "test": []}
    for split in ("train", "test"):
        folder = os.path.join(root, "fruit", split)
        truth = ground_truth.load([folder])
        splits[split] += [(p, truth) for p in _pictures(folder)]
    rng = np.random.default_rng(args.seed)
    for name, xml_dir in (("kangaroo", "annots"), ("raccoon", "annotations")):
        truth = ground_truth.load([os.path.join(root, name, xml_dir)])
        train, test = _held_out([(p, truth) for p in _pictures(os.path.join(root, name, "images"))],
                                args.test_percent, rng)
        splits["train"] += train
        splits["test"] += test
    return _write_boxed(splits, root, args)


def images(args) -> dict:
    """Any boxed pictures: --input's image files, their true boxes from --ground_truth (else VOC XML beside them),
    split by a seeded shuffle into train (and calib) and test."""
    import numpy as np

    from . import ground_truth, inputs

    files = [p for p in inputs.match_patterns(args.input) if p.lower().endswith(PICTURE_EXTS)]
    if not files:
        raise OptionsError(f"--input {' '.join(args.input)} matches no .jpg, .jpeg or .png file")
    truth = (ground_truth.load(args.ground_truth) if args.ground_truth else ground_truth.beside_images(files))
    if truth is None:
        raise OptionsError(f"no true boxes for the {len(files)} pictures of --input: no VOC XML beside them (same "
                           "stem, or in annots/ or annotations/ next to their folder); pass --ground_truth "
                           "VOC_DIR|COCO.json|TFRECORDS")
    train, test = _held_out([(p, truth) for p in files], args.test_percent, np.random.default_rng(args.seed))
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])
    return _write_boxed({"train": train, "test": test}, root, args)


def _write_boxed(splits: dict, root: str, args) -> dict:
    """Write each split's (picture, GroundTruth) pairs as one shard; image-level labels are the picture's object
    names, and `args.calib_per_class` single-class training pictures per class go to a calib split. Boxes are
    turned from the picture as seen to the stored grid TFRecords keep (models/reading.py turns them back)."""
    from PIL import Image, ImageOps

    from weakloc.models import boxes, images as imagelib, records

    os.makedirs(args.output, exist_ok=True)
    examples = {"train": [], "calib": [], "test": []}
    per_class_calib: dict[str, int] = {}
    skipped = unknown = 0
    for split, items in splits.items():
        for img_path, truth in items:
            with open(img_path, "rb") as f:
                encoded = f.read()
            try:
                with Image.open(img_path) as im:
                    orientation = imagelib.file_orientation(img_path)
                    w, h = ImageOps.exif_transpose(im).size
            except Exception as exc:  # a truncated JPEG still has a header; a broken one is left out, said so
                logger.warning("skipping %s: %s", img_path, exc)
                skipped += 1
                continue
            objs = truth.pixel_boxes(img_path, img_path, w, h, orientation)
            if objs is None:
                unknown += 1
                continue
            names = sorted({o[0] for o in objs})
            if not names:
                continue
            target = split
            if split == "train" and len(names) == 1 and per_class_calib.get(names[0], 0) < args.calib_per_class:
                per_class_calib[names[0]] = per_class_calib.get(names[0], 0) + 1
                target = "calib"
            seen = [[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for _, b in objs]
            stored = boxes.orient_normalized_boxes(seen, _INVERSE_ORIENTATION.get(orientation, orientation)).tolist()
            examples[target].append(records.make_example(
                encoded, source_id=os.path.relpath(img_path, root), filename=os.path.basename(img_path),
                label_texts=names, boxes=stored, box_texts=[o[0] for o in objs], width=w, height=h))
    if unknown:
        logger.warning("%d pictures have no true boxes in the ground truth and were left out", unknown)
    made = {}
    for split, exs in examples.items():
        paths = files.shard_paths(args.output, split, 1)
        files.write_tfrecord_shards(exs, paths)
        made[split] = {"images": len(exs), "files": paths}
    made["skipped_unreadable"] = {"images": skipped, "files": []}
    made["without_ground_truth"] = {"images": unknown, "files": []}
    return made
