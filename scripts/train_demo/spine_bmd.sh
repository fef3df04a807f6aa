#!/usr/bin/env bash
# Demo bundle of spine_bmd (DSNet, light variant), reproducible from synthetic lumbar CT.
#
#   scripts/train_demo/spine_bmd.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2); under the sealed test protocol
#    (models/README.md) pass a validation set of seeds 100-199 as HOLDOUT_DATA instead, e.g.
#    `dicomnode-train synth spine_bmd --out VAL --n 60 --seed 100`, and never a sealed (9010-9019) set,
# 2. train the light variant of the same design (Faster R-CNN + FPN, DS attention after the stem and the last
#    kept stage, ResNet18 trunk without layer4: SPINE_LIGHT_ARGS, ~10.4 MB fp16) with the paper's optimiser
#    (SGD lr 0.01, momentum 0.9, batch 9) for EPOCHS epochs instead of 100, weights stored in fp16,
# 3. evaluate on every study of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json, report.md.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS, IMAGE_SIZE, BACKBONE, MAX_STEPS (cap of
# steps per epoch; empty by default), INIT_FROM (a spine_bmd bundle of the same architecture to start from),
# TRAIN_ARGS (more `train` options, e.g. "--set split.val=0.12"), INIT_MODE and INIT_SKIP (`init_mode`, `init_skip`
# of INIT_FROM, e.g. matching and [backbone.body.attn_*]), VARIANT (light|faithful), CACHE_DIR (a sample cache shared
# between runs), BASELINE (1: also score the histogram baseline; 0: skip it), TRAIN_DATA and HOLDOUT_DATA (data
# folders to use, synthesised there with seeds 1 and 2 only when missing; default OUT_DIR/train_data and
# OUT_DIR/holdout_data, always synthesised afresh).
# Tiny CPU check:   N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 DEVICE=cpu IMAGE_SIZE=160 MAX_STEPS=3 WORKERS=2 \
#                   scripts/train_demo/spine_bmd.sh /tmp/spine_demo
# issue 34 (2026-12-08, demo-20261208s): DEVICE=cpu WORKERS=1 EPOCHS=6 MAX_STEPS=60 DEADLINE=... EVAL_RESERVE_S=600 \
#                   INIT_FROM=models/spine_bmd/demo-20261203b TRAIN_DATA=TRAIN HOLDOUT_DATA=VAL TRAIN_ARGS="--set \
#                   split.train=0.82 --set split.val=0.12 --set split.holdout=0.06 --set task.tune_class_offsets=true"
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
VARIANT=${VARIANT:-light}
BASELINE=${BASELINE:-1}
MAX_STEPS=${MAX_STEPS:-}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
# shellcheck source=scripts/train_demo/_data.sh
source "$(dirname "$0")/_data.sh"
mkdir -p "$OUT"
rm -rf "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"
synth_sets spine_bmd

"$PY" -m training.cli train spine_bmd --data "$TRAIN_DATA" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" \
    --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 4)" \
    --set variant="$VARIANT" --backbone "$BACKBONE" --set image_size="$IMAGE_SIZE" \
    --set schedule=cosine --set min_lr=0.0005 ${MAX_STEPS:+--set max_steps_per_epoch=$MAX_STEPS} \
    ${CACHE_DIR:+--set cache_dir="$CACHE_DIR"} ${INIT_FROM:+--set init_from="$INIT_FROM"} \
    ${INIT_MODE:+--set init_mode="$INIT_MODE"} ${INIT_SKIP:+--set "init_skip=$INIT_SKIP"} \
    ${TRAIN_ARGS:-} $(budget_args)

baseline=()
if [ "$BASELINE" = 1 ]; then baseline=(--baseline-train "$TRAIN_DATA"); fi
"$PY" -m training.cli evaluate "$OUT/bundle" --data "$HOLDOUT_DATA" --subset all --device "$DEVICE" \
    "${baseline[@]}" --out "$OUT/eval"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
