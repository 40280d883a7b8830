#!/usr/bin/env bash
# The README's "your own photos" walkthrough (fruit photos with VOC XML beside them), run twice in two folders:
# prints each run's test-split figures beside the full-image and centred-box baselines, then whether the two runs
# printed the same figures (timings and paths aside). Usage: benchmarks/walkthrough_twice.sh [FRUIT_DIR] [WORK_DIR]
set -euo pipefail
P=${1:-$(dirname "$0")/../../shared/data/photos/fruit}
W=${2:-/tmp/weakloc-walkthrough}
P=$(cd "$P" && pwd)
for run in a b; do
  D="$W/$run"; rm -rf "$D"; mkdir -p "$D"; cd "$D"
  weakloc train --input "$P/train/*.jpg" --ground_truth "$P/train" --output fruit.keras \
                --epochs 10 --patience 10 --flip_augment --cache > train.out 2> train.err
  weakloc calibrate --input "$P/train/*.jpg" --model fruit.keras --output fruit.thresholds.json \
                > calibrate.out 2> calibrate.err
  weakloc label --input "$P/test/*.jpg" --model fruit.keras --output labels --labels_from_folder no \
                --emit_cams --runner=FnApiRunner > label.out 2> label.err
  weakloc evaluate --annotations labels --ground_truth "$P/test" > evaluate.out 2> evaluate.err
  echo "== run $run: $(grep -E '^chosen:' calibrate.out); $(grep -E '^threshold:' calibrate.out)"
  sed -n 1,5p evaluate.out
done
# What may differ: timings (wall time, Keras's per-epoch seconds) and the run's own folder.
figures() { grep -v 'wall time' "$1" | sed -E 's# - [0-9.]+m?s - [0-9.]+m?s/step##; s#'"$W"'/[ab]/##g'; }
same=yes
for f in train.out calibrate.out label.out evaluate.out; do
  if ! diff -q <(figures "$W/a/$f") <(figures "$W/b/$f") > /dev/null; then
    same=no; echo "differs: $f"
  fi
done
echo "two runs print the same figures: $same"
