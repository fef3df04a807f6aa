#!/usr/bin/env bash
# Issue 8's backbone comparison: the four spine_bmd backbones (resnet50, +SE, +SK, +DS) trained with the same budget on
# the same data, evaluated on the same fresh-seed hold-out, in one table beside the paper's Table 1.
#
#   scripts/train_demo/spine_backbones.sh OUT_DIR
#
# TRAIN_DATA, HOLDOUT_DATA: existing synthetic sets (default: synthesise N_TRAIN with seed 1, N_HOLDOUT with seed 2).
# SHARED_START: a spine_bmd bundle whose non-attention weights (trunk, FPN, RPN, box head) every variant starts from;
#   its attention modules are never copied (`init_mode=matching`, `init_skip=[backbone.body.attn_*]`), so every
#   variant, DS included, starts its attention fresh from the same shared weights, as the paper's variants all start
#   from the same ImageNet ResNet50. Empty: every variant trains from scratch (the fair choice on a GPU with a
#   longer budget).
# EPOCHS, MAX_STEPS (cap of steps per epoch), DEVICE, VARIANT (light|faithful), IMAGE_SIZE, BACKBONES, CACHE_DIR
#   (a sample cache shared by the runs; the pre-processing does not depend on the backbone), TRAIN_ARGS.
# DEADLINE (unix seconds, e.g. a borrowed GPU's lease end): the time left is shared out equally among the backbones
#   still to train; each run keeps EVAL_RESERVE_S (default 300) for its hold-out evaluation.
# Each backbone is one run of scripts/train_demo/spine_bmd.sh (same train and evaluate commands as the demo bundle,
# histogram baseline skipped) into OUT_DIR/<backbone>.
# CPU (2 cores, about 30 min per backbone):
#   TRAIN_DATA=/tmp/sp/train140 HOLDOUT_DATA=/tmp/sp/holdout40 SHARED_START=models/spine_bmd/demo-20261203b \
#   EPOCHS=1 MAX_STEPS=150 DEVICE=cpu scripts/train_demo/spine_backbones.sh /tmp/spine_backbones
# Result: OUT_DIR/compare/compare.md (and compare.json); bundle and evaluation per backbone under OUT_DIR/<backbone>.
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
BACKBONES=${BACKBONES:-resnet50 resnet50_se resnet50_sk resnet50_ds}
SHARED_START=${SHARED_START:-}
mkdir -p "$OUT"
export TRAIN_DATA=${TRAIN_DATA:-$OUT/train_data} HOLDOUT_DATA=${HOLDOUT_DATA:-$OUT/holdout_data}
export CACHE_DIR=${CACHE_DIR:-$OUT/cache} BASELINE=0 EVAL_RESERVE_S=${EVAL_RESERVE_S:-300}
export TRAIN_ARGS="--set task.tune_class_offsets=true ${TRAIN_ARGS:-}"
if [ -n "$SHARED_START" ]; then
    export INIT_FROM=$SHARED_START INIT_MODE=matching INIT_SKIP='[backbone.body.attn_*]'
else
    unset INIT_FROM INIT_MODE INIT_SKIP
fi
lease_end=${DEADLINE:-}
evals=()
todo=$(wc -w <<<"$BACKBONES")
for bb in $BACKBONES; do
    if [ -n "$lease_end" ]; then
        export DEADLINE=$(( $(date +%s) + (lease_end - $(date +%s)) / todo ))
    fi
    todo=$(( todo - 1 ))
    BACKBONE=$bb VERSION="ablation-$bb" bash "$(dirname "$0")/spine_bmd.sh" "$OUT/$bb"
    evals+=("$OUT/$bb/eval")
done

"${PYTHON:-.venv/bin/python}" -m training.cli compare "${evals[@]}" --out "$OUT/compare"
echo "comparison: $OUT/compare/compare.md"
