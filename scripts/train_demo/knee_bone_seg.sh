#!/usr/bin/env bash
# Demo bundle of knee_bone_seg (2D U-Net, femur/tibia/fibula sigmoid channels), reproducible from synthetic studies.
#
#   scripts/train_demo/knee_bone_seg.sh OUT_DIR
#
# 1. synthesise a training set (seed 1) and a fresh-seed validation set (HOLDOUT_SEED, default 100: the validation
#    seed block 100-199 of the sealed test protocol in models/README.md): coronal or sagittal multi-slice knee MR
#    (training.synth.knee_bone_seg: shape modes, flexion, rotations and patient offsets, menisci, ligaments,
#    effusion/degeneration; T1, PD fat-sat or PD at 1.5/3 T, 256-384 matrix at 0.3-0.5 mm, 3-4.5 mm slices,
#    24-40 slices, bias field, Rician noise; exact .mha label maps 1 femur / 2 tibia / 3 fibula),
# 2. fit the population z-score on (up to 16 volumes of) the training split and store it in the task config
#    (or, with INIT_FROM and NORM_FROM_INIT=1, keep the source bundle's),
# 3. train the faithful network (unet2d, depth 4, 32 channels everywhere, ELU, dropout 0.5 at the bottleneck,
#    211,011 parameters = 0.4 MB in fp16, far under the 25 MB cap, so no lighter variant) with the faithful task and
#    training config: 140 mm window at the femur/tibia junction -> 224x224, native slices, N4 (shrink 4),
#    soft-Dice loss (empty-on-empty = 1), Adam 1e-3 -> 1e-4 on a plateau, early stopping patience 10, best epoch
#    by validation mean Dice. Demo-only addition: left-right flip and +-10 % intensity augmentation (the default).
#    Weights stored in fp16.
# 4. evaluate on every study of the fresh-seed hold-out (--subset all): OUT_DIR/eval/metrics.json and report.md with
#    Dice and HD95 per bone (fibula separately) on the source grid beside the published Dice 98 % / IoU 96 %.
#
# Sizes: N_TRAIN, N_HOLDOUT, HOLDOUT_SEED, NORM_FROM_INIT, EPOCHS, DEVICE (auto|cpu|cuda), WORKERS (synthesis + pre-processing processes),
# BATCH (default 16), INIT_FROM (a knee bundle to start from instead of the Glorot initialisation: continue a run cut
# short by a time budget, or warm-start a retraining), ITK_THREADS (SimpleITK threads per process, default 2), TRAIN_ARGS (extra `train` options, e.g. for a quick check
# "--set max_steps_per_epoch=2").
# Tiny CPU check:   N_TRAIN=6 N_HOLDOUT=2 EPOCHS=1 DEVICE=cpu WORKERS=2 TRAIN_ARGS="--set max_steps_per_epoch=2" \
#                   scripts/train_demo/knee_bone_seg.sh /tmp/knee_demo
# GPU (H100):       PYTHON=python3 PYTHONPATH=. N_TRAIN=96 N_HOLDOUT=16 EPOCHS=25 WORKERS=12 \
#                   scripts/train_demo/knee_bone_seg.sh out
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-96}
N_HOLDOUT=${N_HOLDOUT:-16}
HOLDOUT_SEED=${HOLDOUT_SEED:-100}
EPOCHS=${EPOCHS:-25}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
BATCH=${BATCH:-16}
VERSION=${VERSION:-demo-$(date -u +%Y%m%d)}
LOADERS=$([ "$DEVICE" = cpu ] && echo 0 || echo "$WORKERS")
export ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=${ITK_THREADS:-2}

# shellcheck source=scripts/train_demo/_budget.sh
source "$(dirname "$0")/_budget.sh"
mkdir -p "$OUT"
rm -rf "$OUT/train_data" "$OUT/holdout_data" "$OUT/bundle" "$OUT/bundle.work" "$OUT/eval"

"$PY" -m training.cli synth knee_bone_seg --out "$OUT/train_data" --n "$N_TRAIN" --seed 1 --workers "$WORKERS"
"$PY" -m training.cli synth knee_bone_seg --out "$OUT/holdout_data" --n "$N_HOLDOUT" --seed "$HOLDOUT_SEED" \
    --workers "$WORKERS"

# population z-score of the prepared crops -> "--set task.norm_mean=... --set task.norm_std=..."; a warm start with
# NORM_FROM_INIT=1 keeps the source bundle's z-score (its first layer was trained on it; saves pre-processing 16
# volumes)
if [ -n "${INIT_FROM:-}" ] && [ "${NORM_FROM_INIT:-0}" = 1 ]; then
    NORM=$("$PY" -c 'import json, sys; i = json.load(open(sys.argv[1] + "/bundle.json"))["input"]
print("--set task.norm_mean=%s --set task.norm_std=%s" % (i["mean"], i["std"]))' "$INIT_FROM")
else
    NORM=$("$PY" -m training.tasks.knee_bone_seg norm --data "$OUT/train_data" --max-records 16 --workers "$WORKERS")
fi
echo "z-score: $NORM"

# shellcheck disable=SC2086  # NORM is a list of options
"$PY" -m training.cli train knee_bone_seg --data "$OUT/train_data" --out "$OUT/bundle" \
    --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "$VERSION" --workers "$LOADERS" $NORM \
    --set batch_size="$BATCH" ${INIT_FROM:+--set init_from="$INIT_FROM"} \
    ${TRAIN_ARGS:-} $(budget_args)

"$PY" -m training.cli evaluate "$OUT/bundle" --data "$OUT/holdout_data" --subset all --device "$DEVICE" \
    --out "$OUT/eval" --workers "$LOADERS"

du -sh "$OUT/bundle"
echo "bundle: $OUT/bundle  evaluation: $OUT/eval/report.md"
