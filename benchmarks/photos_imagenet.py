"""The shared photos with the off-the-shelf ImageNet MobileNetV2 (issue 17): what `calibrate` chooses on the 25
boxed calibration photos, scored on the test photos beside calibrated vanilla CAM and the baselines.

    weakloc datasets photos --root ../shared/data/photos --output $W/data --calib_per_class 5
    python benchmarks/photos_imagenet.py --data $W/data --model ../shared/models/mobilenet_v2_imagenet.keras

The photos' classes are not the model's: each maps to the ImageNet class that names it (apple -> Granny Smith,
kangaroo -> wallaby); raccoon, which ImageNet lacks, gets the map of the model's top-1 class. Every method is
fitted and cross-validated by `models/choose.py` on the calibration photos only (as `weakloc calibrate` does) and
applied to the test photos with `Fitted.boxes`, the boxes `label` makes from the file (tests/test_choose.py).
Scores come from `metrics.evaluate_rows` (`weakloc evaluate`), in model-input pixels (IoU does not change when
both axes are scaled). Prints one JSON document.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from weakloc.models import boxes as boxlib
from weakloc.models import choose, metrics, opening
from weakloc.pipeline import inputs

CLASS_MAP = {"apple": "Granny Smith", "banana": "banana", "orange": "orange", "kangaroo": "wallaby, brush kangaroo"}


def maps_of(opened, kind, examples, names, class_map):
    """Maps of every (photo, true class) pair with the model's class for it (top-1 where unmapped)."""
    spec = dataclasses.replace(opened.spec, contrast=kind.contrast, flip_tta=kind.flip_tta)
    model = spec.build(opened.keras_model, top_k=1)
    index = {n: i for i, n in enumerate(opened.spec.class_names)}
    h, w = model.input_size
    scale = np.array([w, h, w, h], np.float32)
    normed, valid, truths, classes, top1_ok, rows = [], [], [], [], [], []
    for ex in examples:
        ids = np.asarray(ex.gt_ids[: len(ex.gt_boxes)])
        known = sorted({int(c) for c in ids if c >= 0})
        if not known:
            continue
        model_ids = [index[class_map[names[c]]] if names[c] in class_map else -1 for c in known]
        out = model(ex.pixels[None], extra=np.array([model_ids], np.int32))
        top = int(out.top_classes[0, 0])
        for j, (c, m) in enumerate(zip(known, model_ids)):
            col = 1 + j if m >= 0 else 0  # the mapped class's map, else the top-1 class's
            n_, v_ = boxlib.normalize_cams(out.maps(np.array([0]), np.array([col])))
            normed.append(n_[0])
            valid.append(v_[0])
            truths.append(ex.gt_boxes[: len(ids)][ids == c] * scale)
            classes.append(c)
            top1_ok.append(top == m if m >= 0 else None)
            rows.append((ex.image_id, c, top))
    return choose.Maps(np.stack(normed), np.array(valid), truths, np.array(classes)), top1_ok, rows


def score(fitted, maps, top1_ok, names, size):
    """evaluate_rows of the boxes `fitted` makes: GT-known and Top-1 Loc (Top-1 over the mapped classes)."""
    xyxy, has = fitted.boxes(maps.normed, maps.valid, maps.classes)
    h, w = size
    rows = []
    for i in range(len(maps.classes)):
        c = int(maps.classes[i])
        gt = [{"class_id": c, "xmin": float(b[0]), "ymin": float(b[1]), "xmax": float(b[2]), "ymax": float(b[3])}
              for b in maps.truths[i]]
        boxes = [{"class_id": c, "xmin": float(xyxy[i, 0]), "ymin": float(xyxy[i, 1]), "xmax": float(xyxy[i, 2]),
                  "ymax": float(xyxy[i, 3])}] if has[i] else []
        rows.append({"width": w, "height": h, "gt_boxes": gt, "boxes": boxes,
                     "classes": [{"class_id": c if top1_ok[i] else -1}]})
    ev = metrics.evaluate_rows(rows, names)
    mapped = [i for i, ok in enumerate(top1_ok) if ok is not None]
    ev["top1_loc_mapped"] = metrics.evaluate_rows([rows[i] for i in mapped], names)["top1_loc"]
    return ev


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="output of weakloc datasets photos (calib-*, test-*)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    opened = opening.open_model(args.model)
    prep = opened.spec.prep

    def examples(split):
        src = inputs.scan([os.path.join(args.data, f"{split}-*.tfrecord")])
        names = list(src.class_names)
        src = inputs.scan([os.path.join(args.data, f"{split}-*.tfrecord")], class_names=names)
        return names, list(inputs.iterate(src, input_size=prep.input_size))

    names, calib = examples("calib")
    test_names, test = examples("test")
    assert test_names == names, (names, test_names)
    kinds = dict.fromkeys(c.maps for c in choose.CANDIDATES)
    calib_maps = {k: maps_of(opened, k, calib, names, CLASS_MAP)[0] for k in kinds}
    choice = choose.choose(calib_maps)
    report = {"calibration_pairs": len(calib_maps[choose.PLAIN].classes), "chosen": choice.winner.candidate.name,
              "candidates": {s.candidate.name: None if s.accuracy is None else s.accuracy.tolist()
                             for s in choice.scores}, "test": {}}
    vanilla = choose.choose(calib_maps, [choose.DEFAULT]).winner
    for label, fitted in (("cam (calibrated vanilla)", vanilla), (f"chosen: {choice.winner.candidate.name}",
                                                                  choice.winner)):
        maps, top1_ok, _ = maps_of(opened, fitted.candidate.maps, test, names, CLASS_MAP)
        ev = score(fitted, maps, top1_ok, names, prep.input_size)
        report["test"][label] = {"gt_known": ev["gt_known"], "top1_loc_mapped": ev["top1_loc_mapped"],
                                 "mean_iou": ev["mean_iou"], "pairs": ev["pairs"],
                                 "per_class_corloc_0.5": {k: v["corloc"][0.5] for k, v in ev["per_class"].items()},
                                 "threshold": fitted.default}
        report["test"]["baselines"] = ev["baselines"]
        if fitted is vanilla:
            sweep = metrics.sweep_thresholds(maps.normed, maps.truths, valid=maps.valid)
            report["test"][label]["max_box_acc_v2_on_test"] = sweep.max_box_acc_v2
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
