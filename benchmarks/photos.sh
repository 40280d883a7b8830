#!/usr/bin/env bash
# The real-photos run of BENCHMARKS.md: fruit (train/test as given) + kangaroo + raccoon (80/20 split), image
# labels from the VOC object names, 5 boxed training photos per class set aside for calibration, boxes of the
# test photos used only for evaluation. Usage: benchmarks/photos.sh [PHOTOS_DIR] [WORK_DIR]
set -euo pipefail
P=${1:-$(dirname "$0")/../../shared/data/photos}
W=${2:-/tmp/weakloc-photos}
mkdir -p "$W"
[ -f "$W/data/dataset.json" ] || weakloc datasets photos --root "$P" --output "$W/data" --calib_per_class 5
[ -f "$W/model/photos.keras" ] || /usr/bin/time -f "train wall %e s" \
  weakloc train --input "$W/data/train-*.tfrecord" --output "$W/model/photos.keras" --input_size 128,128 \
    --epochs 30 --patience 5 --batch_size 32 --flip_augment --cache --val_percent 15
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/photos.keras" --candidates cam \
  --output "$W/model/photos.thresholds.json" --min_per_class 5 --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/photos.keras" --flip_tta \
  --output "$W/model/photos_tta.thresholds.json" --min_per_class 5 --overwrite
# --classes both: a box for the predicted class and for each labelled class, so GT-known Loc covers every image.
weakloc label --input "$W/data/test-*.tfrecord" --model "$W/model/photos.keras" --output "$W/labels" \
  --classes both --overwrite --runner=FnApiRunner
weakloc evaluate --annotations "$W/labels" | tee "$W/evaluation.txt"
weakloc label --input "$W/data/test-*.tfrecord" --model "$W/model/photos.keras" --output "$W/labels_tta" \
  --thresholds "$W/model/photos_tta.thresholds.json" --flip_tta --classes both --overwrite --runner=FnApiRunner
weakloc evaluate --annotations "$W/labels_tta" | tee "$W/evaluation_tta.txt"
# Contrast CAMs and box refinement, both fitted on the same 25 boxed calibration photos (flip averaging kept).
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/photos.keras" --flip_tta --cam_contrast \
  --refine_boxes --output "$W/model/photos_refined.thresholds.json" --min_per_class 5 --overwrite
weakloc label --input "$W/data/test-*.tfrecord" --model "$W/model/photos.keras" --output "$W/labels_refined" \
  --thresholds "$W/model/photos_refined.thresholds.json" --flip_tta --classes both --overwrite --runner=FnApiRunner
weakloc evaluate --annotations "$W/labels_refined" | tee "$W/evaluation_refined.txt"
# A pretrained backbone needs ImageNet weights, which this machine cannot download: this shows the message.
weakloc train --input "$W/data/train-*.tfrecord" --output "$W/model/mnv2.keras" --arch mobilenetv2 --epochs 1 \
  --overwrite \
  || echo "(mobilenetv2 with ImageNet weights: not available offline, exit $?)"
