"""Finer CAMs from a trained backbone classifier, and what they cost in forward time.

    python benchmarks/finer_maps.py rebuild --model ft.keras --output ft_320.keras --input_size 320,320
    python benchmarks/finer_maps.py rebuild --model ft.keras --output ft_s1.keras --last_stride_arch mobilenetv2
    python benchmarks/finer_maps.py time ft.keras ft_320.keras ft_s1.keras [--batch 16 --rounds 5]

`rebuild` re-makes the trained network's graph at a larger input or with its last stride-2 stage at stride 1
(dilated after it), with the trained weights unchanged (models/backbones.rebuild), and writes it with its sidecar:
the finer map with no retraining. `time` runs each model's compiled forward pass on the same random batch in
interleaved rounds and prints the fastest round's milliseconds per image (on a shared machine the least disturbed
one; the median beside it) and the ratio of fastest rounds to the first model.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def rebuild(args) -> None:
    from weakloc.models import backbones, graph, sidecar
    from weakloc.models.opening import load_keras_model

    model = load_keras_model(args.model)
    size = tuple(int(v) for v in args.input_size.split(",")) if args.input_size else None
    new = backbones.rebuild(model, input_size=size, last_stride_arch=args.last_stride_arch)
    new.save(args.output)
    with open(sidecar.sidecar_path(args.model)) as f:
        side = json.load(f)
    side["input_size"] = [int(d) for d in new.inputs[0].shape[1:3]]
    side["rebuilt_from"] = {"model": args.model, "input_size": size, "last_stride_arch": args.last_stride_arch,
                            "final_feature_map": [int(d) for d in graph.find_gap_head(new).feature.shape[1:3]]}
    with open(sidecar.sidecar_path(args.output), "w") as f:
        json.dump(side, f, indent=2)
    print(f"{args.output}: input {side['input_size']}, map {side['rebuilt_from']['final_feature_map']}")


def timing(args) -> None:
    import numpy as np
    import tensorflow as tf

    from weakloc.models.graph import find_gap_head
    from weakloc.models.opening import load_keras_model

    fns, names = [], []
    for path in args.models:
        model = load_keras_model(path)
        h, w = (int(d) for d in model.inputs[0].shape[1:3])
        x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (args.batch, h, w, 3)).astype(np.float32))
        fn = tf.function(lambda t, m=model: m(t, training=False))
        fn(x)  # trace and warm up
        fns.append((fn, x))
        names.append(f"{os.path.basename(path)} ({h}x{w}, map {find_gap_head(model).feature.shape[1:3]})")
    per_image = [[] for _ in fns]
    for _ in range(args.rounds):
        for i, (fn, x) in enumerate(fns):
            t0 = time.perf_counter()
            fn(x).numpy()
            per_image[i].append((time.perf_counter() - t0) / args.batch * 1000)
    base = min(per_image[0])
    for name, times in zip(names, per_image):
        print(f"{name:50s} fastest {min(times):6.1f} ms/image  x{min(times) / base:.2f}  "
              f"median {float(np.median(times)):6.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("rebuild")
    rb.add_argument("--model", required=True)
    rb.add_argument("--output", required=True)
    rb.add_argument("--input_size")
    rb.add_argument("--last_stride_arch")
    tm = sub.add_parser("time")
    tm.add_argument("models", nargs="+")
    tm.add_argument("--batch", type=int, default=16)
    tm.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    rebuild(args) if args.cmd == "rebuild" else timing(args)


if __name__ == "__main__":
    main()
