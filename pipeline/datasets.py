"""`weakloc datasets`: benchmark and demo datasets as TFRecord shards with image-level labels and true boxes.

    weakloc datasets cluttered-mnist --idx_dir ../shared/data/mnist --output data/cmnist
    weakloc datasets shapes --output data/shapes

cluttered-mnist (see models/mnist.py) writes train-*, calib-* and eval-* shards. Digits 0-7999 of the MNIST test
set feed training and calibration, 8000-9999 evaluation, so no source digit (nor clutter fragment) is shared
between the canvases a model learns or calibrates on and those it is scored on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from weakloc.models import mnist, synthetic

from .demo import write_shards
from .options import OptionsError

logger = logging.getLogger(__name__)

SPLIT_AT = 8000


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="weakloc datasets", allow_abbrev=False, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    cm = sub.add_parser("cluttered-mnist", help="the cluttered MNIST benchmark (96x96 canvases)")
    cm.add_argument("--idx_dir", help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                                      "(default: download through keras.datasets, which needs the internet)")
    cm.add_argument("--output", required=True)
    cm.add_argument("--train", type=int, default=16000, help="training canvases")
    cm.add_argument("--eval", type=int, default=2000, help="evaluation canvases")
    cm.add_argument("--calib_per_class", type=int, default=10, help="calibration canvases per digit")
    cm.add_argument("--size", type=int, default=96)
    cm.add_argument("--shards", type=int, default=4)
    cm.add_argument("--seed", type=int, default=0)
    sh = sub.add_parser("shapes", help="the synthetic shapes set of `weakloc demo`")
    sh.add_argument("--output", required=True)
    sh.add_argument("--train", type=int, default=2400)
    sh.add_argument("--eval", type=int, default=400)
    sh.add_argument("--calib", type=int, default=40)
    sh.add_argument("--size", type=int, default=64)
    sh.add_argument("--shards", type=int, default=2)
    sh.add_argument("--seed", type=int, default=0)
    return ap


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if os.path.isdir(args.output) and any(n.endswith(".tfrecord") for n in os.listdir(args.output)):
        raise OptionsError(f"--output {args.output} already holds TFRecord shards; choose a new directory")
    os.makedirs(args.output, exist_ok=True)
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
                           "files": write_shards(data, args.output, shards, split)}
            logger.info("%s: %d canvases from digits %d-%d", split, len(data.labels), lo, hi - 1)
    else:
        made = {}
        for split, n, seed in (("train", args.train, args.seed), ("calib", args.calib, args.seed + 1),
                               ("eval", args.eval, args.seed + 2)):
            data = synthetic.make_shapes(n, size=args.size, seed=seed)
            made[split] = {"images": n, "files": write_shards(data, args.output, args.shards if split != "calib"
                                                              else 1, split)}
    doc = {"dataset": args.dataset, "options": vars(args), "splits": made}
    with open(os.path.join(args.output, "dataset.json"), "w") as f:
        json.dump(doc, f, indent=2)
    for split, info in made.items():
        print(f"{split:6s} {info['images']:6d} images  {os.path.join(args.output, split)}-*.tfrecord", flush=True)
    return doc
