"""Co-localization, fused maps and test-time averaging on the shared photos with the off-the-shelf MobileNetV2.

    python benchmarks/photos_coloc.py --data W/data --model ../shared/models/mobilenet_v2_imagenet.keras

W/data from `weakloc datasets photos --root ../shared/data/photos --output W/data --calib_per_class 5`. The photos'
labels are mapped to the ImageNet classes that name them (apple -> Granny Smith, banana, orange, kangaroo ->
wallaby); raccoon has no ImageNet class and is left out. For every (image, true class) pair the map of that class
is boxed at thresholds chosen on the calib-* photos only (overall and per class, as `weakloc calibrate`), and
scored on test-*: GT-known Loc, Top-1 Loc, MaxBoxAccV2 (threshold-free), beside the full-image and centred boxes.
Co-localization statistics come from the train-* photos (labels only, no boxes) - the `--coloc_stats` reuse of
a nightly run - and, as a second reading, from the test photos themselves (what one `label` job computes).
The maps are the library's (models/cam.py with features, models/coloc.py); prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from weakloc.models import boxes as boxlib
from weakloc.models import annotate, cam, coloc, metrics, opening
from weakloc.pipeline import coloc_options, inputs

CLASS_MAP = {"apple": "Granny Smith", "banana": "banana", "orange": "orange", "kangaroo": "wallaby, brush kangaroo"}
PHOTO_CLASSES = ("apple", "banana", "kangaroo", "orange", "raccoon")


def _split(data, split, model, names, batch=32):
    """Per image of a split: features float16 (h, w, K) (the head's or `--coloc_layer`'s), top-1 class, model class
    ids of its labels with their CAMs (the head's grid), and per true class its boxes in model-input pixels."""
    h, w = model.input_size
    scale = np.array([w, h, w, h], np.float32)
    idx = {n: names.index(CLASS_MAP[n]) for n in CLASS_MAP}
    source = inputs.scan([f"{data}/{split}-*.tfrecord"], class_names=PHOTO_CLASSES)
    exs = list(inputs.iterate(source, input_size=model.input_size))
    labels = [sorted({idx[PHOTO_CLASSES[c]] for c in e.label_ids if PHOTO_CLASSES[c] in idx}) for e in exs]
    feats, top1, cams = [], [], []
    for s in range(0, len(exs), batch):
        rows = labels[s : s + batch]
        out = model(np.stack([e.pixels for e in exs[s : s + batch]]), annotate.padded_ids(rows))
        feats.append(out.features.astype(np.float16))
        top1.append(out.top_classes[:, 0])
        k = out.top_classes.shape[1]
        cams.extend({c: out.low_res[i, k + j] for j, c in enumerate(r)} for i, r in enumerate(rows))
    truths = []
    for e in exs:
        per = {}
        for c, b in zip(e.gt_ids, e.gt_boxes):
            if c >= 0 and PHOTO_CLASSES[c] in idx:
                per.setdefault(idx[PHOTO_CLASSES[c]], []).append(b * scale)
        truths.append({c: np.array(v, np.float32) for c, v in per.items()})
    return dict(features=np.concatenate(feats), top1=np.concatenate(top1), labels=labels, cams=cams, truths=truths)


def _stats(split):
    """{class id: Component} from the labelled images of a split (each image counts for each of its labels, its
    CAM of that label signing the component)."""
    acc = {}
    for f, labs, cams in zip(split["features"], split["labels"], split["cams"]):
        for c in labs:
            acc.setdefault(c, coloc.ClassStats.zeros(f.shape[-1])).add(coloc.ClassStats.of(f, cams[c]))
    return {c: coloc.principal_component(s) for c, s in acc.items()}


def _pairs(split):
    out = [(i, c, t) for i, tr in enumerate(split["truths"]) for c, t in sorted(tr.items())]
    return np.array([p[0] for p in out]), np.array([p[1] for p in out]), [p[2] for p in out]


def _maps(split, comps, img, cls, size):
    """Low-res maps of each pair for every method, upsampled and normalised: {method: (normed, valid)}.
    The co-localization and fused maps come from coloc.colocalized, as `label` makes them."""
    f = split["features"][img].astype(np.float32)  # (n, h, w, K)
    cams = np.stack([split["cams"][i][c] for i, c in zip(img, cls)])
    low = {"cam": cams}
    if comps is not None:
        out = cam.CamOutputs(None, None, None, cls[:, None].astype(np.int32), cams[:, None], size, f)
        for name, maps, mode in (("coloc", "coloc", "mean"), ("fused_mean", "fused", "mean"),
                                 ("fused_product", "fused", "product")):
            low[name] = coloc.colocalized(out, comps, maps, mode)[0].low_res[:, 0]
    return {m: boxlib.normalize_cams(cam.upsample(v, size)) for m, v in low.items()}


def _boxes_iou(normed, valid, taus, truths):
    found = boxlib.boxes_from_cams(normed, taus, valid=valid)
    ious = np.zeros(len(normed), np.float32)
    ious[found.map_index] = metrics.best_iou(found.xyxy, [truths[i] for i in found.map_index])
    return ious


def evaluate(splits, comps_for, size, min_per_class=5):
    """{method: figures} calibrated on calib, scored on test."""
    cal, test = splits["calib"], splits["test"]
    ci, cc, ct = _pairs(cal)
    ti, tc, tt = _pairs(test)
    cal_maps = _maps(cal, comps_for["calib"], ci, cc, size)
    test_maps = _maps(test, comps_for["test"], ti, tc, size)
    top1_ok = test["top1"][ti] == tc
    out = {}
    for m in cal_maps:
        n_c, v_c = cal_maps[m]
        calib = metrics.calibrate(n_c, ct, cc, valid=v_c, min_per_class=min_per_class)
        taus = np.array([calib.per_class[c].best_threshold if c in calib.per_class else calib.overall.best_threshold
                         for c in tc], np.float32)
        n_t, v_t = test_maps[m]
        ious = _boxes_iou(n_t, v_t, taus, tt)
        sweep = metrics.sweep_thresholds(n_t, tt, valid=v_t)
        out[m] = {
            "tau": calib.overall.best_threshold,
            "per_class_tau": {int(c): s.best_threshold for c, s in calib.per_class.items()},
            "gt_known": {lv: float((ious >= lv).mean()) for lv in metrics.IOU_LEVELS},
            "top1_loc": {lv: float(((ious >= lv) & top1_ok).mean()) for lv in metrics.IOU_LEVELS},
            "mean_iou": float(ious.mean()),
            "max_box_acc_v2_test": sweep.max_box_acc_v2,
            "max_box_acc_v2_calib": calib.overall.max_box_acc_v2,
        }
    h, w = size
    rel = np.concatenate([(t[:, 2:] - t[:, :2]) / (w, h) for t in tt])
    mw, mh = np.median(rel, axis=0)
    for name, box in (("full_image", [0, 0, w, h]),
                      ("centred_median", [w * (1 - mw) / 2, h * (1 - mh) / 2, w * (1 + mw) / 2, h * (1 + mh) / 2])):
        ious = metrics.best_iou(np.tile(np.array(box, np.float32), (len(tt), 1)), tt)
        out[name] = {"gt_known": {lv: float((ious >= lv).mean()) for lv in metrics.IOU_LEVELS},
                     "mean_iou": float(ious.mean())}
    out["_pairs"] = {"calib": len(cc), "test": len(tc), "test_top1": float(top1_ok.mean())}
    return out


def _cached(folder, tta, compute):
    if not folder:
        return compute()
    import os
    import pickle

    path = os.path.join(folder, f"features-{tta.replace(':', '_').replace(',', '+').replace('@', '-')}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    splits = compute()
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(splits, f, protocol=4)
    return splits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tta", action="append",
                    help="SCALES[:flip], e.g. 1 or 1,1.5:flip (repeatable; default: 1, 1:flip, 2, 1,2:flip)")
    ap.add_argument("--output", help="JSON of every figure")
    ap.add_argument("--cache", help="folder to keep each TTA setting's features in, to re-score without the forward")
    ap.add_argument("--coloc_layer", action="append",
                    help="co-localize on this layer's map (repeatable; 'auto' as label's; 'head' or absent: the GAP "
                         "head's features)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    opened = opening.open_model(args.model)
    keras_model, prep = opened.keras_model, opened.spec.prep
    names = list(prep.class_names)
    results = {}
    settings = [(t, layer) for layer in (args.coloc_layer or ["head"]) for t in (args.tta or ["1", "1:flip", "2",
                                                                                              "1,2:flip"])]
    for tta_only, layer_arg in settings:
        scales_s, _, flip = tta_only.partition(":")
        scales = tuple(float(v) for v in scales_s.split(","))
        layer = None
        if layer_arg not in (None, "head"):
            layer = coloc_options.resolve_layer(keras_model, opened.spec, layer_arg)
        tta = tta_only if layer is None else f"{tta_only}@{layer}"
        model = coloc.ColocModel(keras_model, input_size=prep.input_size, scale=prep.scale, offset=prep.offset,
                                 scales=scales, flip_tta=flip == "flip", coloc_layer=layer)
        t0 = time.time()
        splits = _cached(args.cache, tta, lambda: {s: _split(args.data, s, model, names)
                                                   for s in ("train", "calib", "test")})
        seconds = time.time() - t0
        size = model.input_size
        from_train = _stats(splits["train"])
        from_test = _stats(splits["test"])
        for stats_name, comps in (("train", from_train), ("test", from_test)):
            res = evaluate(splits, {"calib": from_train, "test": comps}, size)
            results[f"{tta} stats={stats_name}"] = res
        results[f"{tta} stats=train"]["_seconds_forward"] = seconds
        print(f"\n== TTA {tta}  (forward + features of {sum(len(s['top1']) for s in splits.values())} photos: "
              f"{seconds:.0f} s; grid {splits['test']['features'].shape[1:3]})", flush=True)
        pairs = results[f"{tta} stats=train"]["_pairs"]
        print(f"   pairs: calib {pairs['calib']}, test {pairs['test']}; top-1 on test pairs {pairs['test_top1']:.1%}")
        print(f"   {'method':28s} {'tau':>5s}  GT@0.3  GT@0.5  GT@0.7  Top1@0.5  MaxBoxAccV2(test)  mIoU")
        for key in (f"{tta} stats=train", f"{tta} stats=test"):
            for m, r in results[key].items():
                if m.startswith("_") or "tau" not in r or (key.endswith("test") and m == "cam"):
                    continue
                label = m + ("" if m == "cam" else f" [stats {key.split('=')[1]}]")
                g = r["gt_known"]
                print(f"   {label:28s} {r['tau']:5.2f}  {g[0.3]:6.1%}  {g[0.5]:6.1%}  {g[0.7]:6.1%}  "
                      f"{r['top1_loc'][0.5]:7.1%}  {r['max_box_acc_v2_test']:8.1f}  {r['mean_iou']:.3f}")
        for m in ("full_image", "centred_median"):
            g = results[f"{tta} stats=train"][m]["gt_known"]
            print(f"   {m:28s} {'':5s}  {g[0.3]:6.1%}  {g[0.5]:6.1%}  {g[0.7]:6.1%}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
