#!/usr/bin/env bash
# The finer-final-map variant of BENCHMARKS.md: same data as cluttered_mnist.sh (run that first), a 48x48 final
# feature map instead of 24x24. Usage: benchmarks/cluttered_mnist_stride2.sh [WORK_DIR]
set -euo pipefail
W=${1:-/tmp/weakloc-cmnist}
[ -f "$W/model_s2/cmnist.keras" ] || /usr/bin/time -f "train wall %e s" \
  weakloc train --input "$W/data/train-*.tfrecord" --output "$W/model_s2/cmnist.keras" --epochs 8 --cache \
    --final_stride 2
weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model_s2/cmnist.keras" --candidates cam \
  --output "$W/thr/s2_global.json" --min_per_class 1000 --overwrite
weakloc label --input "$W/data/eval-*.tfrecord" --model "$W/model_s2/cmnist.keras" --output "$W/labels/s2_global" \
  --thresholds "$W/thr/s2_global.json" --classes both --overwrite --runner=FnApiRunner
weakloc evaluate --annotations "$W/labels/s2_global" --output "$W/reports/s2_global.json" | tee "$W/reports/s2_global.txt"
weakloc calibrate --input "$W/data/eval-*.tfrecord" --model "$W/model_s2/cmnist.keras" --candidates cam \
  --output "$W/reports/eval_sweep_s2.json" --overwrite | tail -4
