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
#   still to train, each keeping EVAL_RESERVE_S (default 300) for its hold-out evaluation.
# CPU (2 cores, about 30 min per backbone):
#   TRAIN_DATA=/tmp/sp/train140 HOLDOUT_DATA=/tmp/sp/holdout40 SHARED_START=models/spine_bmd/demo-20261203b \
#   EPOCHS=1 MAX_STEPS=150 DEVICE=cpu scripts/train_demo/spine_backbones.sh /tmp/spine_backbones
# Result: OUT_DIR/compare/compare.md (and compare.json), one evaluation per backbone under OUT_DIR/eval_<backbone>.
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-200}
N_HOLDOUT=${N_HOLDOUT:-40}
EPOCHS=${EPOCHS:-8}
MAX_STEPS=${MAX_STEPS:-}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-12}
VARIANT=${VARIANT:-light}
IMAGE_SIZE=${IMAGE_SIZE:-384}
BACKBONES=${BACKBONES:-resnet50 resnet50_se resnet50_sk resnet50_ds}
SHARED_START=${SHARED_START:-}
mkdir -p "$OUT"
CACHE_DIR=${CACHE_DIR:-$OUT/cache}

TRAIN_DATA=${TRAIN_DATA:-$OUT/train_data}
HOLDOUT_DATA=${HOLDOUT_DATA:-$OUT/holdout_data}
[ -d "$TRAIN_DATA" ] || "$PY" -m training.cli synth spine_bmd --out "$TRAIN_DATA" --n "$N_TRAIN" --seed 1 \
    --workers "$WORKERS"
[ -d "$HOLDOUT_DATA" ] || "$PY" -m training.cli synth spine_bmd --out "$HOLDOUT_DATA" --n "$N_HOLDOUT" --seed 2 \
    --workers "$WORKERS"

init_args=()
if [ -n "$SHARED_START" ]; then
    init_args=(--set init_from="$SHARED_START" --set init_mode=matching --set 'init_skip=[backbone.body.attn_*]')
fi
evals=()
todo=$(wc -w <<<"$BACKBONES")
for bb in $BACKBONES; do
    budget=()
    if [ -n "${DEADLINE:-}" ]; then
        left=$(( (DEADLINE - $(date +%s)) / todo - ${EVAL_RESERVE_S:-300} ))
        budget=(--set time_budget_s=$(( left > 30 ? left : 30 )))
    fi
    todo=$(( todo - 1 ))
    rm -rf "$OUT/bundle_$bb" "$OUT/bundle_$bb.work" "$OUT/eval_$bb"
    "$PY" -m training.cli train spine_bmd --data "$TRAIN_DATA" --out "$OUT/bundle_$bb" \
        --epochs "$EPOCHS" --device "$DEVICE" --fp16 --synthetic --version "ablation-$bb" \
        --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 4)" \
        --set variant="$VARIANT" --backbone "$bb" --set image_size="$IMAGE_SIZE" \
        --set schedule=cosine --set min_lr=0.0005 --set cache_dir="$CACHE_DIR" \
        --set task.tune_class_offsets=true \
        ${MAX_STEPS:+--set max_steps_per_epoch=$MAX_STEPS} \
        "${init_args[@]}" "${budget[@]}" ${TRAIN_ARGS:-}
    "$PY" -m training.cli evaluate "$OUT/bundle_$bb" --data "$HOLDOUT_DATA" --subset all --device "$DEVICE" \
        --out "$OUT/eval_$bb"
    evals+=("$OUT/eval_$bb")
done

"$PY" -m training.cli compare "${evals[@]}" --out "$OUT/compare"
echo "comparison: $OUT/compare/compare.md"
