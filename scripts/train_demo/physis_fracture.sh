#!/usr/bin/env bash
# Demo bundle of physis_fracture (two-stage, light variant), reproducible from synthetic paediatric radiographs.
#
#   scripts/train_demo/physis_fracture.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2),
# 2. box-patch pretraining (training.patch_pretrain, PRETRAIN_S seconds; 0 skips it): each of the three networks
#    learns PATCH-pixel patches of its own input (detector trunk, crop classifier, whole-image classifier; see
#    training/tasks/physis_patches.py), fracture boxes against negative images at the same positions, on the
#    training split only. The thesis started from ImageNet weights, which are never downloaded here.
# 3. train the two-stage method (detector + crop classifier + whole-image classifier in one bundle) in the light
#    variant of the same design (Faster R-CNN FPN on a ResNet18 trunk without layer4, PHYSIS_LIGHT_ARGS; ResNet18
#    3-stage crop and whole-image classifiers; ~21.4 MB fp16 in all, under the 25 MB cap; the faithful ResNet50
#    configuration is ~135 MB) with the detector input at 1024 px, weights stored in fp16,
#    starting from step 2's weights,
# 4. evaluate on every image of the fresh-seed hold-out (--subset all): all three methods (two-stage, whole-image
#    classifier, detector alone) in one table beside the thesis's accuracies, with AUC CI, mAP@0.5 and FROC:
#    OUT_DIR/eval/metrics.json and report.md.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS, DET_SIDE, IMAGE_SIZE, CROP_SIZE, BATCH,
# DIFFICULTY (synthesis, 0 obvious .. 1 subtle; default the generator's own), PRETRAIN_S, PATCH, PATCH_BATCH, TRAIN_DATA / HOLDOUT_DATA
# (existing folders to reuse), TRAIN_ARGS (extra `train` options), LOADERS (data-loading processes; 0 on a CPU).
# Tiny CPU check:  N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 DEVICE=cpu DET_SIDE=256 IMAGE_SIZE=128 CROP_SIZE=64 \
#                  scripts/train_demo/physis_fracture.sh /tmp/physis_demo
# CPU (2 cores; the shipped demo-20261206p, ~3.2 h in three runs): DEVICE=cpu WORKERS=2 LOADERS=2 N_TRAIN=400 N_HOLDOUT=150 \
#                  DIFFICULTY=0.2 DET_SIDE=512 IMAGE_SIZE=384 CROP_SIZE=128 PRETRAIN_S=900 EPOCHS=100 \
#                  PATCH_BATCH=32 TRAIN_ARGS="--set time_budget_s=3000" scripts/train_demo/physis_fracture.sh out
#                  then continued for 45 min on the same data:
#                  ... PRETRAIN_S=0 EPOCHS=4 TRAIN_DATA=out/train_data HOLDOUT_DATA=out/holdout_data \
#                  TRAIN_ARGS="--set init_from=out/bundle --set time_budget_s=2700" scripts/train_demo/physis_fracture.sh out2
#                  (that was demo-20261203p), then 6 more epochs from it (cosine, 80 min):
#                  ... PRETRAIN_S=0 EPOCHS=6 TRAIN_DATA=out/train_data HOLDOUT_DATA=out/holdout_data \
#                  TRAIN_ARGS="--set init_from=out2/bundle --set time_budget_s=6000" scripts/train_demo/physis_fracture.sh out3
# GPU (H100):      PYTHON=python3 PYTHONPATH=. N_TRAIN=800 N_HOLDOUT=200 EPOCHS=12 \
#                  scripts/train_demo/physis_fracture.sh out
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-800}
N_HOLDOUT=${N_HOLDOUT:-200}
EPOCHS=${EPOCHS:-12}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
DET_SIDE=${DET_SIDE:-1024}
IMAGE_SIZE=${IMAGE_SIZE:-512}
CROP_SIZE=${CROP_SIZE:-224}
BATCH=${BATCH:-8}
DIFFICULTY=${DIFFICULTY:-}
PRETRAIN_S=${PRETRAIN_S:-300}
PATCH=${PATCH:-64}
PATCH_BATCH=${PATCH_BATCH:-64}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}
LOADERS=${LOADERS:-$([ "$DEVICE" = cpu ] && echo 0 || echo "$WORKERS")}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
# shellcheck source=scripts/train_demo/_data.sh
source "$(dirname "$0")/_data.sh"
mkdir -p "$OUT"
rm -rf "$OUT/pretrain" "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"
synth_sets physis_fracture ${DIFFICULTY:+--difficulty "$DIFFICULTY"}

TASK_ARGS=(--set task.variant=light --set task.det_long_side="$DET_SIDE" --set task.image_size="$IMAGE_SIZE"
           --set task.crop_size="$CROP_SIZE")
INIT=()
if [ "$PRETRAIN_S" != 0 ]; then
  "$PY" -m training.cli pretrain-patches physis_fracture --data "$TRAIN_DATA" --out "$OUT/pretrain" \
      --device "$DEVICE" --workers "$WORKERS" --synthetic --version "$VERSION-pretrain" \
      --set steps=1000000 --set time_budget_s="$PRETRAIN_S" --set patch="$PATCH" \
      --set batch_size="$PATCH_BATCH" "${TASK_ARGS[@]}"
  INIT=(--set init_from="$OUT/pretrain")
fi

"$PY" -m training.cli train physis_fracture --data "$TRAIN_DATA" --out "$OUT/bundle" \
    --method two_stage --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" \
    --workers "$LOADERS" "${TASK_ARGS[@]}" --set train.batch_size="$BATCH" "${INIT[@]}" ${TRAIN_ARGS:-} \
    $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$HOLDOUT_DATA" --subset all --device "$DEVICE" \
    --baseline-train "$TRAIN_DATA" \
    --out "$OUT/eval"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
