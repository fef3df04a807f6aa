#!/usr/bin/env bash
# Demo bundle of wrist_fracture (ResNet18, 341x512, "at least one" study rule), reproducible from synthetic studies.
#
#   scripts/train_demo/wrist_fracture.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2): adult PA + lateral wrist radiographs
#    (training.synth.wrist_fracture, difficulty 0.5, 2 % label noise, ~31 % with a distal radius fracture),
# 2. train the faithful network (resnet_classifier, ResNet18, 1 channel, one logit; 22.4 MB in fp16, under the 25 MB
#    cap, so no lighter variant) with the faithful task config: radiograph pre-processing (header inversion,
#    part splitter, fingers-up alignment, 2:3 letterbox to 341x512, mean 0.34587 / std 0.22898), random crop
#    90-100 % + horizontal flip, Adam lr 1e-3, batch 32, class-balanced sampling (2 x minority per epoch, no
#    replacement), best epoch by validation study accuracy (ALO). Demo-only addition: a cosine LR schedule.
#    Weights stored in fp16.
# 3. evaluate on every study of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json, report.md with
#    the thesis figures beside ours, ROC / calibration / confusion-matrix plots.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS (synthesis + pre-processing processes),
# DIFFICULTY (synthetic generator, 0 obvious .. 1 subtle; default 0.5 for both sets).
# Tiny CPU check:   N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 DEVICE=cpu scripts/train_demo/wrist_fracture.sh /tmp/wrist_demo
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
DIFFICULTY=${DIFFICULTY:-0.5}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}
LOADERS=$([ "$DEVICE" = cpu ] && echo 0 || echo "$WORKERS")

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
mkdir -p "$OUT"
rm -rf "$OUT/train_data" "$OUT/holdout_data" "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"

"$PY" -m training.cli synth wrist_fracture --out "$OUT/train_data" --n "$N_TRAIN" --seed 1 --workers "$WORKERS" --difficulty "$DIFFICULTY"
"$PY" -m training.cli synth wrist_fracture --out "$OUT/holdout_data" --n "$N_HOLDOUT" --seed 2 --workers "$WORKERS" --difficulty "$DIFFICULTY"

"$PY" -m training.cli train wrist_fracture --data "$OUT/train_data" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" --workers "$LOADERS" \
    --set schedule=cosine --set min_lr=0.00001 ${TRAIN_ARGS:-} $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$OUT/holdout_data" --subset all --device "$DEVICE" \
    --baseline-train "$OUT/train_data" \
    --out "$OUT/eval" --workers "$LOADERS"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
