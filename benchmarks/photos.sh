#!/usr/bin/env bash
# The real-photos run of BENCHMARKS.md: fruit (train/test as given) + kangaroo + raccoon (80/20 split), image
# labels from the VOC object names, 5 boxed training photos per class set aside for calibration, boxes of the
# test photos used only for evaluation. Three models: a CNN from scratch, the shared ImageNet MobileNetV2
# fine-tuned on the image labels (plus its finer-map variants), and that ImageNet model as it is, boxing the four
# classes ImageNet has. Every threshold is chosen on the 25 calibration photos.
# Usage: benchmarks/photos.sh [PHOTOS_DIR] [WORK_DIR] [MODELS_DIR]
set -euo pipefail
P=${1:-$(dirname "$0")/../../shared/data/photos}
W=${2:-/tmp/weakloc-photos}
M=${3:-$(dirname "$0")/../../shared/models}
B=$(dirname "$0")
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

# The shared ImageNet MobileNetV2, fine-tuned from its file: head on the frozen backbone, then the last stage, both
# on the frozen layers' outputs cached once (add --no_feature_cache to finetune's flags to time the old way).
# box() calibrates a model on the calibration photos, labels the test photos and evaluates them; flags after a
# "--" go to calibrate alone (e.g. --unlabelled).
box() {  # box MODEL RUN [calibrate and label flags...] [-- calibrate-only flags...]
  local model=$1 run=$2 both=() only=(); shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do both+=("$1"); shift; done
  [ $# -gt 0 ] && shift && only=("$@")
  set -- "${both[@]}"
  weakloc calibrate --input "$W/data/calib-*.tfrecord" --model "$W/model/$model.keras" "$@" "${only[@]}" \
    --output "$W/model/$run.thresholds.json" --min_per_class 5 --overwrite
  weakloc label --input "$W/data/test-*.tfrecord" --model "$W/model/$model.keras" --output "$W/labels_$run" \
    --thresholds "$W/model/$run.thresholds.json" "$@" --classes both --overwrite --runner=FnApiRunner
  weakloc evaluate --annotations "$W/labels_$run" | tee "$W/evaluation_$run.txt"
}
finetune() {  # finetune NAME [train flags...]
  [ -f "$W/model/$1.keras" ] || /usr/bin/time -f "train $1 wall %e s" weakloc train \
    --input "$W/data/train-*.tfrecord" --output "$W/model/$1.keras" --arch mobilenetv2 \
    --weights "$M/mobilenet_v2_imagenet.keras" --flip_augment --cache --val_percent 15 "${@:2}"
}
finetune ft
box ft ft
box ft ft_tta --flip_tta
# Finer maps. Trained: a head on block_13_expand_relu (14x14 at 224). Without retraining: the fine-tuned network
# re-built at 320x320 (10x10), and with block 13 at stride 1 and blocks 14-16 dilated (14x14).
finetune ft_b13 --feature_layer block_13_expand_relu
box ft_b13 ft_b13
# calibrate also searches the instance peak split (peak_distance 0 / 0.1 / 0.15); on these photos it keeps it off.
box ft_b13 ft_b13_inst --boxes instances
box ft_b13 ft_b13_tta_inst --flip_tta --boxes instances
# Co-localization statistics pooled over the 505 training photos too (their image-level labels; no box is read):
# calibrate picks fused_mean for ft_b13, fused_fine_mean for ft.
box ft ft_unl -- --unlabelled "$W/data/train-*.tfrecord"
box ft_b13 ft_b13_unl -- --unlabelled "$W/data/train-*.tfrecord"
# One box per object on the best maps by instance F1 among CAM and co-localization rows (the best photo row,
# BENCHMARKS.md 2026-12-04: calibrate chose coloc).
INSTANCE_MAPS=cam,flip,coloc,fused_mean,fused_product,coloc_fine,fused_fine_mean
box ft_b13 ft_b13_inst_unl --boxes instances -- --candidates "$INSTANCE_MAPS" --unlabelled "$W/data/train-*.tfrecord"
box ft ft_inst_unl --boxes instances -- --candidates "$INSTANCE_MAPS" --unlabelled "$W/data/train-*.tfrecord"
finetune ft_s1t --last_stride 1
box ft_s1t ft_s1t
python "$B/finer_maps.py" rebuild --model "$W/model/ft.keras" --output "$W/model/ft_320.keras" --input_size 320,320
box ft_320 ft_320
python "$B/finer_maps.py" rebuild --model "$W/model/ft.keras" --output "$W/model/ft_s1.keras" \
  --last_stride_arch mobilenetv2
box ft_s1 ft_s1
python "$B/finer_maps.py" time "$W/model/ft.keras" "$W/model/ft_b13.keras" "$W/model/ft_320.keras" \
  "$W/model/ft_s1.keras" | tee "$W/forward_time.txt"

# The ImageNet model as it is, boxing the labels ImageNet has through a class map (issue 13 part B's script).
"$B/photos_class_map.sh" "$P" "$W" "$M/mobilenet_v2_imagenet.keras"
