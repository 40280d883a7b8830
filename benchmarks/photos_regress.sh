#!/usr/bin/env bash
# Issue 17's off-the-shelf table with every calibrate candidate (co-localization through the class map and the
# self-trained box regressor included) beside calibrated vanilla CAM: the shared ImageNet MobileNetV2, no
# training; calibrate chooses on the 25 boxed calibration photos (the regressor self-trains on the 505 train
# photos' pseudo-boxes, no box read), label boxes the 133 test photos following the file, evaluate scores them.
# Usage: benchmarks/photos_regress.sh [PHOTOS_DIR] [WORK_DIR] [MODEL]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
P=${1:-$HERE/../../shared/data/photos}
W=${2:-/tmp/weakloc-photos-h17}
M=${3:-$HERE/../../shared/models/mobilenet_v2_imagenet.keras}
MAP=$HERE/photos_class_map.json
mkdir -p "$W/regress"
[ -f "$W/data/dataset.json" ] || weakloc datasets photos --root "$P" --output "$W/data" --calib_per_class 5
run() {  # name, calibrate flags...
  local name=$1 thr="$W/regress/$1.thresholds.json"; shift
  /usr/bin/time -f "calibrate $name wall %e s" weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$M" \
    --class_map "$MAP" --output "$thr" --min_per_class 5 --overwrite "$@" | tee "$W/regress/$name.calibrate.txt"
  /usr/bin/time -f "label $name wall %e s" weakloc label --input "$W/data/test-*.tfrecord" --model "$M" \
    --class_map "$MAP" --classes labels --thresholds "$thr" --output "$W/regress/$name" --overwrite \
    --runner=FnApiRunner
  weakloc evaluate --annotations "$W/regress/$name" | tee "$W/regress/$name.txt"
}
run vanilla --candidates cam
run chosen --unlabelled "$W/data/train-*.tfrecord"
