#!/usr/bin/env bash
# Demo bundle of wrist_fracture (ResNet18, 341x512, "at least one" study rule), reproducible from synthetic studies.
#
#   scripts/train_demo/wrist_fracture.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2): adult PA + lateral wrist radiographs
#    (training.synth.wrist_fracture, DIFFICULTY, 2 % label noise, ~31 % with a distal radius fracture),
# 2. box-patch pretraining (training.patch_pretrain, PRETRAIN_S seconds; 0 skips it): the same ResNet18 learns
#    PATCH x PATCH patches of its own inputs, fracture boxes against negative studies at the same positions, on
#    the training split only. The thesis started from ImageNet weights, which are never downloaded here; from
#    random weights the whole-image network stays at chance for hundreds of steps (models/README.md).
#    PRETRAIN_HW (e.g. [256,171] with PATCH=64) pretrains at a smaller input size (a quarter of the pixels); WARMUP_S
#    then trains the whole-image classifier at that size before the full-size run.
# 3. train the faithful network (resnet_classifier, ResNet18, 1 channel, one logit; 22.4 MB in fp16, under the 25 MB
#    cap, so no lighter variant) with the faithful task config, starting from step 2's weights: radiograph
#    pre-processing (header inversion, part splitter, fingers-up alignment, 2:3 letterbox to 341x512, mean 0.34587 /
#    std 0.22898), random crop 90-100 % + horizontal flip, Adam lr 1e-3, batch 32, class-balanced sampling
#    (2 x minority per epoch, no replacement), best epoch by validation study accuracy (ALO). Image labels from the
#    fracture boxes (IMAGE_LABELS=boxes; "study" gives every image its study's label, as the thesis had to).
#    Demo-only addition: a cosine LR schedule. Weights stored in fp16.
# 4. evaluate on every study of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json, report.md with
#    the thesis figures beside ours, ROC / calibration / confusion-matrix plots.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS (synthesis + pre-processing processes),
# DIFFICULTY (synthetic generator, 0 obvious .. 1 subtle; default the generator's own), TRAIN_DATA / HOLDOUT_DATA (existing folders to reuse),
# TRAIN_ARGS (extra `train` options), LOADERS (data-loading processes; default 0 on a CPU). With DEADLINE the
# pretraining stages keep their seconds and the final run gets the rest (scripts/train_demo/_budget.sh).
# INIT_FROM (a bundle or pretraining directory of the same network): warm start, e.g. from the shipped bundle after a
# generator change; the patch pretraining and the warm-up are then skipped (PRETRAIN_S and WARMUP_S ignored).
# Warm start on CPU (issue 34, demo-20261208w): INIT_FROM=models/wrist_fracture/demo-20261203w DEVICE=cpu WORKERS=1 \
#                   LOADERS=0 N_TRAIN=600 EPOCHS=4 TRAIN_ARGS="--set lr=0.0003" DEADLINE=$(date -d 01:50 +%s) \
#                   HOLDOUT_DATA=VAL_DIR scripts/train_demo/wrist_fracture.sh out
# Tiny CPU check:   N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 PRETRAIN_S=5 DEVICE=cpu scripts/train_demo/wrist_fracture.sh /tmp/w
# CPU (2 cores, ~60 min; the shipped demo-20261203w): DEVICE=cpu WORKERS=2 LOADERS=2 DIFFICULTY=0.2 \
#                   PRETRAIN_HW=[256,171] PATCH=64 PRETRAIN_S=900 WARMUP_S=480 EPOCHS=3 \
#                   scripts/train_demo/wrist_fracture.sh out
# GPU (H100):       PYTHON=python3 PYTHONPATH=. N_TRAIN=2000 N_HOLDOUT=400 EPOCHS=30 \
#                   scripts/train_demo/wrist_fracture.sh out
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-2000}
N_HOLDOUT=${N_HOLDOUT:-400}
EPOCHS=${EPOCHS:-30}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
DIFFICULTY=${DIFFICULTY:-}
IMAGE_LABELS=${IMAGE_LABELS:-boxes}
PRETRAIN_S=${PRETRAIN_S:-300}
PRETRAIN_HW=${PRETRAIN_HW:-}
PATCH=${PATCH:-128}
WARMUP_S=${WARMUP_S:-0}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}
LOADERS=${LOADERS:-$([ "$DEVICE" = cpu ] && echo 0 || echo "$WORKERS")}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
# shellcheck source=scripts/train_demo/_data.sh
source "$(dirname "$0")/_data.sh"
mkdir -p "$OUT"
rm -rf "$OUT/pretrain" "$OUT/warmup" "$OUT/warmup.work" "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"
synth_sets wrist_fracture ${DIFFICULTY:+--difficulty "$DIFFICULTY"}

INIT=()
if [ -n "${INIT_FROM:-}" ]; then
  PRETRAIN_S=0
  WARMUP_S=0
  INIT=(--set init_from="$INIT_FROM")
fi
if [ "$PRETRAIN_S" != 0 ]; then
  "$PY" -m training.cli pretrain-patches wrist_fracture --data "$TRAIN_DATA" --out "$OUT/pretrain" \
      --device "$DEVICE" --workers "$WORKERS" --synthetic --version "$VERSION-pretrain" \
      --set steps=1000000 --set time_budget_s="$PRETRAIN_S" --set patch="$PATCH" \
      ${PRETRAIN_HW:+--set input_hw="$PRETRAIN_HW"}
  INIT=(--set init_from="$OUT/pretrain")
fi
if [ "$WARMUP_S" != 0 ]; then
  "$PY" -m training.cli train wrist_fracture --data "$TRAIN_DATA" --out "$OUT/warmup" \
      --epochs 1000 --device "$DEVICE" --synthetic --version "$VERSION-warmup" --workers "$LOADERS" \
      --set image_labels="$IMAGE_LABELS" --set time_budget_s="$WARMUP_S" \
      ${PRETRAIN_HW:+--set input_hw="$PRETRAIN_HW"} "${INIT[@]}"
  INIT=(--set init_from="$OUT/warmup")
fi

"$PY" -m training.cli train wrist_fracture --data "$TRAIN_DATA" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" --workers "$LOADERS" \
    --set schedule=cosine --set min_lr=0.00001 --set image_labels="$IMAGE_LABELS" "${INIT[@]}" \
    ${TRAIN_ARGS:-} $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$HOLDOUT_DATA" --subset all --device "$DEVICE" \
    --baseline-train "$TRAIN_DATA" \
    --out "$OUT/eval" --workers "$LOADERS"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
