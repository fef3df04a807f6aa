#!/usr/bin/env bash
# Demo bundle of spine_bmd (DSNet, light variant), reproducible from synthetic lumbar CT.
#
#   scripts/train_demo/spine_bmd.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2),
# 2. train the light variant of the same design (Faster R-CNN + FPN, DS attention after the stem and the last
#    kept stage, ResNet18 trunk without layer4: SPINE_LIGHT_ARGS, ~10.4 MB fp16) with the paper's optimiser
#    (SGD lr 0.01, momentum 0.9, batch 9) for EPOCHS epochs instead of 100, weights stored in fp16,
# 3. evaluate on every study of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json, report.md.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS, IMAGE_SIZE, BACKBONE, MAX_STEPS (cap of
# steps per epoch; empty by default), INIT_FROM (a spine_bmd bundle of the same architecture to start from),
# TRAIN_ARGS (more `train` options, e.g. "--set split.val=0.12").
# Tiny CPU check:   N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 DEVICE=cpu IMAGE_SIZE=160 MAX_STEPS=3 WORKERS=2 \
#                   scripts/train_demo/spine_bmd.sh /tmp/spine_demo
# GPU (H100):       PYTHON=python3 PYTHONPATH=. N_TRAIN=200 N_HOLDOUT=40 EPOCHS=8 scripts/train_demo/spine_bmd.sh out
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-200}
N_HOLDOUT=${N_HOLDOUT:-40}
EPOCHS=${EPOCHS:-8}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
IMAGE_SIZE=${IMAGE_SIZE:-384}
BACKBONE=${BACKBONE:-resnet50_ds}
MAX_STEPS=${MAX_STEPS:-}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
mkdir -p "$OUT"
rm -rf "$OUT/train_data" "$OUT/holdout_data" "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"

"$PY" -m training.cli synth spine_bmd --out "$OUT/train_data" --n "$N_TRAIN" --seed 1 --workers "$WORKERS"
"$PY" -m training.cli synth spine_bmd --out "$OUT/holdout_data" --n "$N_HOLDOUT" --seed 2 --workers "$WORKERS"

"$PY" -m training.cli train spine_bmd --data "$OUT/train_data" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" \
    --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 4)" \
    --set variant=light --backbone "$BACKBONE" --set image_size="$IMAGE_SIZE" \
    --set schedule=cosine --set min_lr=0.0005 ${MAX_STEPS:+--set max_steps_per_epoch=$MAX_STEPS} \
    ${INIT_FROM:+--set init_from="$INIT_FROM"} ${TRAIN_ARGS:-} $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$OUT/holdout_data" --subset all --device "$DEVICE" \
    --baseline-train "$OUT/train_data" \
    --out "$OUT/eval"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
