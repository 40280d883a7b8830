"""The off-the-shelf ImageNet classifier boxing a dataset's classes, with no training: a stop-gap for the photo
table until `--class_map` (issue 13 part B) lands.

Writes a GAP classifier whose Dense head keeps only the ImageNet columns named by the map (one ImageNet class per
dataset label, in the dataset's order), so each label's CAM is exactly that ImageNet class's CAM and top-1 is
the argmax among the mapped classes; and a copy of the test shards without the images of unmapped labels.

    python benchmarks/imagenet_subset.py --model ../shared/models/mobilenet_v2_imagenet.keras \
        --map '{"apple": "Granny Smith", "banana": "banana", "kangaroo": "wallaby, brush kangaroo", "orange": "orange"}'  --output W/model/imagenet4.keras \
        --filter 'W/data/test-*.tfrecord' --filter 'W/data/calib-*.tfrecord' --filtered_dir W/data4
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--map", required=True, help='JSON {"label": "model class name", ...} (names as the sidecar spells them)')
    ap.add_argument("--output", required=True)
    ap.add_argument("--filter", action="append", default=[], help="TFRecord pattern to copy without unmapped labels")
    ap.add_argument("--filtered_dir")
    args = ap.parse_args(argv)

    import keras

    from weakloc.models import cam, files, records, sidecar
    from weakloc.models.opening import load_keras_model

    pairs = list(json.loads(args.map).items())
    side = json.load(open(sidecar.sidecar_path(args.model)))
    names = list(side["class_names"])
    missing = [m for _, m in pairs if m not in names]
    if missing:
        raise SystemExit(f"not ImageNet class names of {args.model}: {missing}")
    model = load_keras_model(args.model, safe_mode=True)
    head = cam.find_gap_head(model)
    cols = [names.index(m) for _, m in pairs]
    kernel, bias = head.dense.get_weights()
    x = keras.layers.GlobalAveragePooling2D(name="gap")(head.feature)
    dense = keras.layers.Dense(len(cols), activation="softmax", name="classifier")
    out = dense(x)
    dense.set_weights([kernel[:, cols], bias[cols]])
    subset = keras.Model(model.inputs, out, name="imagenet_subset")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    subset.save(args.output)
    labels = [lab for lab, _ in pairs]
    doc = {"input_size": side["input_size"], "scale": side["scale"], "offset": side["offset"],
           "class_names": labels, "class_map": dict(pairs), "source_model": args.model}
    with open(sidecar.sidecar_path(args.output), "w") as f:
        json.dump(doc, f, indent=2)
    print(f"model: {args.output} ({len(labels)} classes: {dict(pairs)})")

    if args.filter:
        os.makedirs(args.filtered_dir, exist_ok=True)
    for pattern in args.filter:
        for path in sorted(glob.glob(pattern)):
            out_path = os.path.join(args.filtered_dir, os.path.basename(path))
            with open(path, "rb") as src:
                payloads = [data for _, data in records.iter_records(src)]
            keep = [data for data in payloads if set(records.parse_example(data).label_texts) <= set(labels)]
            files.write_tfrecord_shards(keep, [out_path])
            print(f"{out_path}: kept {len(keep)}, dropped {len(payloads) - len(keep)} with unmapped labels")


if __name__ == "__main__":
    main()
