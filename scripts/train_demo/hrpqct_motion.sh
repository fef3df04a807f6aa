#!/usr/bin/env bash
# Demo bundle of hrpqct_motion (Walle et al. 2023 motion CNN), reproducible from synthetic HR-pQCT scans.
#
#   scripts/train_demo/hrpqct_motion.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed hold-out (seed 2): distal radius/tibia phantoms moved
#    during a simulated parallel-beam acquisition and reconstructed by FBP, XtremeCT and XtremeCT II geometries,
# 2. train the faithful network (motion_cnn: 5 blocks 32-64-128-256-256, ~2 MB fp16, so no lighter variant is
#    needed) on 8 slices per scan with Adam lr 1e-3 and the ordinal class-weighted loss, weights stored in fp16,
#    best epoch by validation quadratic-weighted kappa of the rounded expected grade; then, on the validation
#    split, the expected-grade cut points of the highest kappa (CUTPOINTS=1, the default; 0 keeps rounding) and
#    the rescan operating point (P(grade >= 4) threshold) for sensitivity >= RESCAN_SENS (default 0.95) are
#    chosen and recorded in task_config; the split is 70 / 25 / 5 % (the fresh-seed set below is the real
#    hold-out, so the validation split that chooses epoch and operating points gets the patients),
# 3. evaluate on every scan of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json, report.md,
#    confusion matrix and the projection-space motion estimate (Sode SSD) against the predicted grade.
#    The report also scores the histogram baseline (training.baseline) fitted on the training set.
#
# Sizes: N_TRAIN, N_HOLDOUT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS (synthesis processes), BATCH; RESCAN_SENS;
# CUTPOINTS; INIT_FROM (a hrpqct_motion bundle to start from instead of a fresh initialisation); SYNTH_PARAMS
# (generator parameters for both sets, e.g. "texture_sd=0" for an ablation without the soft-tissue texture,
# which is on by default since 2026-12-08); TRAIN_DATA / HOLDOUT_DATA (existing sets to reuse; since the sealed
# test protocol the hold-out should be a validation seed, 100-199, e.g. HOLDOUT_DATA from `synth --seed 100`);
# TRAIN_ARGS (more `train` options, e.g. "--set lr=0.0005" for a warm start); DEADLINE (see _budget.sh).
# CPU warm start of 2026-12-08 (models/README.md): DEVICE=cpu WORKERS=1 EPOCHS=8 N_TRAIN=400
#   INIT_FROM=models/hrpqct_motion/demo-20261203b TRAIN_ARGS="--set lr=0.0005" HOLDOUT_DATA=VAL_SEED_100 ...
# Tiny CPU check:   N_TRAIN=12 N_HOLDOUT=6 EPOCHS=1 DEVICE=cpu scripts/train_demo/hrpqct_motion.sh /tmp/motion_demo
# GPU (H100):       PYTHON=python3 PYTHONPATH=. N_TRAIN=400 N_HOLDOUT=100 EPOCHS=30 \
#                   scripts/train_demo/hrpqct_motion.sh out
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-400}
N_HOLDOUT=${N_HOLDOUT:-100}
EPOCHS=${EPOCHS:-30}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
BATCH=${BATCH:-32}
RESCAN_SENS=${RESCAN_SENS:-0.95}
CUTPOINTS=${CUTPOINTS:-1}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
# shellcheck source=scripts/train_demo/_data.sh
source "$(dirname "$0")/_data.sh"
mkdir -p "$OUT"
rm -rf "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"

param_args=()
for p in ${SYNTH_PARAMS:-}; do param_args+=(--param "$p"); done
synth_sets hrpqct_motion "${param_args[@]}"

"$PY" -m training.cli train hrpqct_motion --data "$TRAIN_DATA" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" \
    --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 8)" \
    --set batch_size="$BATCH" --set schedule=cosine --set min_lr=0.00001 \
    --set split.val=0.25 --set split.holdout=0.05 \
    --set task.aggregation=expected --set task.tune_grade_cutpoints="$([ "$CUTPOINTS" = 1 ] && echo true || echo false)" \
    --set task.rescan_target_sensitivity="$RESCAN_SENS" ${INIT_FROM:+--set init_from="$INIT_FROM"} \
    ${TRAIN_ARGS:-} $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$HOLDOUT_DATA" --subset all --device "$DEVICE" \
    --baseline-train "$TRAIN_DATA" \
    --out "$OUT/eval" --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 8)"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
