#!/usr/bin/env bash
# The cluttered-MNIST benchmark of BENCHMARKS.md, end to end. Usage:
#   benchmarks/cluttered_mnist.sh [IDX_DIR] [WORK_DIR]
# IDX_DIR holds t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (default ../shared/data/mnist);
# everything generated (shards, model, labels, reports) goes under WORK_DIR (default /tmp/weakloc-cmnist).
set -euo pipefail
IDX=${1:-$(dirname "$0")/../../shared/data/mnist}
W=${2:-/tmp/weakloc-cmnist}
RUN="--runner=FnApiRunner"
mkdir -p "$W"

# 1. data: 16,000 training canvases (digits 0-7999), 100 calibration canvases (10 per digit, digits 0-7999),
#    2,000 evaluation canvases (digits 8000-9999)
[ -f "$W/data/dataset.json" ] || weakloc datasets cluttered-mnist --idx_dir "$IDX" --output "$W/data"

# 2. train on image-level labels only (timed)
[ -f "$W/model/cmnist.keras" ] || /usr/bin/time -f "train wall %e s" \
  weakloc train --input "$W/data/train-*.tfrecord" --output "$W/model/cmnist.keras" --epochs 8 --cache

# 3. thresholds from the 100 calibration canvases only (plain CAMs and flip-averaged CAMs)
# what calibrate chooses by itself (issue 17), then plain CAM only (the variants below start from it)
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" \
  --output "$W/thr/chosen.json" --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --candidates cam \
  --output "$W/thr/calibrated.json" --min_per_class 10 --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --flip_tta \
  --output "$W/thr/calibrated_tta.json" --min_per_class 10 --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --boxes union \
  --min_box_area 0.01 --output "$W/thr/calibrated_union.json" --min_per_class 10 --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --fit_box_stretch \
  --min_per_class 1000 --output "$W/thr/global_stretch.json" --overwrite
# the recipe that meets issue 3's targets: contrast CAMs, global threshold, refinement fitted on the same 100 canvases
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --cam_contrast \
  --min_per_class 1000 --output "$W/thr/contrast_global.json" --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --refine_boxes \
  --min_per_class 1000 --output "$W/thr/refined_global.json" --overwrite
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/cmnist.keras" --cam_contrast --refine_boxes \
  --min_per_class 1000 --output "$W/thr/contrast_refined.json" --overwrite
python3 - "$W/thr" <<'PY'
import json, sys
d = sys.argv[1]
cal = json.load(open(f"{d}/calibrated.json"))
json.dump({"default": 0.2}, open(f"{d}/paper_0.2.json", "w"))
json.dump({"default": cal["default"]}, open(f"{d}/global.json", "w"))
PY

# 4. label the 2,000 evaluation canvases with each variant, then score them. --classes both boxes the predicted
#    class and the image's own label, so GT-known Loc is measured even where the top-1 class is wrong.
variant() {  # name, label flags...
  local name=$1; shift
  weakloc label --input "$W/data/eval-*.tfrecord" --model "$W/model/cmnist.keras" --output "$W/labels/$name" \
    --overwrite --classes both $RUN "$@"
  weakloc evaluate --annotations "$W/labels/$name" --output "$W/reports/$name.json" | tee "$W/reports/$name.txt"
}
mkdir -p "$W/reports"
variant chosen --thresholds "$W/thr/chosen.json"
variant paper_0.2 --thresholds "$W/thr/paper_0.2.json"
variant calibrated_global --thresholds "$W/thr/global.json"
variant calibrated_per_class --thresholds "$W/thr/calibrated.json"
variant flip_tta_per_class --thresholds "$W/thr/calibrated_tta.json" --flip_tta
variant global_stretch --thresholds "$W/thr/global_stretch.json"
variant union_per_class --thresholds "$W/thr/calibrated_union.json" --boxes union --min_box_area 0.01
variant contrast_global --thresholds "$W/thr/contrast_global.json"
variant refined_global --thresholds "$W/thr/refined_global.json"
variant contrast_refined --thresholds "$W/thr/contrast_refined.json"

# 5. MaxBoxAccV2 on the evaluation canvases (a measurement over all thresholds; nothing here is chosen on them)
weakloc calibrate --input "$W/data/eval-*.tfrecord" --model "$W/model/cmnist.keras" --candidates cam \
  --output "$W/reports/eval_sweep.json" --overwrite | tail -4
weakloc calibrate --input "$W/data/eval-*.tfrecord" --model "$W/model/cmnist.keras" --flip_tta \
  --output "$W/reports/eval_sweep_tta.json" --overwrite | tail -4
# MaxBoxAccV2 of refined boxes: at every base threshold the refinement is fitted on the calibration canvases only
python3 "$(dirname "$0")/maxboxacc_refined.py" --calib "$W/data/calib-*.tfrecord" --eval "$W/data/eval-*.tfrecord" \
  --model "$W/model/cmnist.keras" --cam_contrast --out "$W/reports/maxboxacc_contrast_refined.json" | tail -1
