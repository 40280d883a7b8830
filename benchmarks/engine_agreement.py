"""How closely each engine and precision reproduces TensorFlow's labels on real weights and real photos.

    python benchmarks/engine_agreement.py [--model ../shared/models/mobilenet_v2_imagenet.keras] \
        [--photos '../shared/data/photos/**/*.jpg'] [--out agreement.json]

Every photo is decoded as `weakloc label` decodes it and run through TensorFlow's compiled CAM graph and through
the OpenVINO conversion of the same graph at f32 and at bf16. Per engine: the share of images with TensorFlow's
top-1 class, the largest score difference, the share of boxes (one per image, of TensorFlow's top class, boxed
as `label` boxes it) within 1e-3 px of TensorFlow's and with IoU >= 0.95 to it, and the largest relative CAM
difference. The issue-14 targets: f32 boxes within 1e-3 px on >= 99%; at the default precision top-1 on >= 99%
of images and IoU >= 0.95 on >= 99% of boxes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def decode_all(paths, input_size):
    from weakloc.models import images

    pixels, sizes, used = [], [], []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        try:
            img = images.decode_image(data, input_size)
        except images.ImageDecodeError:
            continue  # the shared set holds a truncated JPEG on purpose; label turns it into a failure row
        pixels.append(img.pixels)
        sizes.append((img.width, img.height))
        used.append(p)
    return np.stack(pixels), sizes, used


def run_batches(model, pixels, batch_size, extra_fn):
    """Concatenated CamOutputs fields over the batches; `extra_fn(i0, i1)` gives each batch's extra ids."""
    outs = [model(pixels[i : i + batch_size], extra_fn(i, min(i + batch_size, len(pixels))))
            for i in range(0, len(pixels), batch_size)]
    return outs


def boxes_of(outs, sizes, names):
    """One box per image: TensorFlow's top class (requested as the image's label, so every engine boxes the same
    class), boxed as `label` boxes it, in original pixels. Returns float (N, 4), NaN where no box."""
    from weakloc.models import annotate

    opts = annotate.BoxOptions(classes="labels")
    xyxy, i = [], 0
    for o in outs:
        n = len(o.scores)
        metas = [annotate.ImageMeta(f"i{i + j}", "s", *sizes[i + j], label_ids=[int(o.cam_classes[j, -1])])
                 for j in range(n)]
        rows = annotate.annotate_batch(o, metas, names, opts, "m", o.cam_classes[:, -1:])
        for row in rows:
            b = row["boxes"]
            xyxy.append([b[0][k] for k in ("xmin", "ymin", "xmax", "ymax")] if b else [np.nan] * 4)
        i += n
    return np.array(xyxy, np.float64)


def iou_pairs(a, b):
    x0, y0 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x1, y1 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(_SHARED, "models", "mobilenet_v2_imagenet.keras"))
    ap.add_argument("--photos", default=os.path.join(_SHARED, "data", "photos", "**", "*.jpg"))
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from weakloc.models import engines, opening
    from weakloc.models.engines import cache

    opened = opening.open_model(args.model)
    prep = opened.spec.prep
    tf_model = opened.build(top_k=1)
    paths = sorted(glob.glob(args.photos, recursive=True))
    pixels, sizes, used = decode_all(paths, prep.input_size)
    print(f"{len(used)} photos decoded of {len(paths)}", file=sys.stderr)
    names = prep.class_names
    ref = run_batches(tf_model, pixels, args.batch_size, lambda i0, i1: None)
    top1 = np.concatenate([o.top_classes[:, 0] for o in ref])
    label = lambda i0, i1: top1[i0:i1, None]  # noqa: E731  TensorFlow's top class, boxed by every engine
    ref = run_batches(tf_model, pixels, args.batch_size, label)
    ref_boxes = boxes_of(ref, sizes, names)
    ov = engines.get("openvino")
    from weakloc.pipeline.engine import method_options

    key = cache.cache_key(ov, cache.model_digest(opened.spec), method_options(opened.spec, 1))
    path, _ = cache.cached_convert(ov, key, tf_model)
    with open(path, "rb") as f:
        data = f.read()
    report = {"model": args.model, "images": len(used), "native_precisions": list(ov.native_precisions()),
              "auto_precision": ov.resolve_precision("auto"), "engines": {}}
    for precision in ("f32", "bf16"):
        model = engines.EngineCam(ov.load(data, precision), input_size=prep.input_size,
                                  num_classes=tf_model.num_classes, engine="openvino", precision=precision)
        outs = run_batches(model, pixels, args.batch_size, label)
        got_top1 = np.concatenate([o.top_classes[:, 0] for o in outs])
        score_diff = max(float(np.abs(o.scores - r.scores).max()) for o, r in zip(outs, ref))
        cam_rel = max(float(np.abs(o.low_res - r.low_res).max() / max(np.abs(r.low_res).max(), 1e-12))
                      for o, r in zip(outs, ref))
        got_boxes = boxes_of(outs, sizes, names)
        both = ~np.isnan(ref_boxes[:, 0]) & ~np.isnan(got_boxes[:, 0])
        px = np.abs(got_boxes - ref_boxes).max(axis=1)
        iou = iou_pairs(got_boxes[both], ref_boxes[both])
        report["engines"][f"openvino_{precision}"] = {
            "top1_agreement": float(np.mean(got_top1 == top1)),
            "max_score_difference": score_diff,
            "max_cam_relative_difference": cam_rel,
            "boxes": int(len(ref_boxes)),
            "boxes_missing_on_one_side": int(np.sum(np.isnan(ref_boxes[:, 0]) != np.isnan(got_boxes[:, 0]))),
            "share_boxes_within_1e-3_px": float(np.mean(np.where(both, px <= 1e-3, False))),
            "max_box_difference_px": float(np.nanmax(px)),
            "share_boxes_iou_ge_0.95": float(np.mean(np.concatenate([iou >= 0.95, np.zeros(np.sum(~both), bool)]))),
            "min_box_iou": float(iou.min()) if len(iou) else None,
        }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
