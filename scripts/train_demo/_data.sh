# Sourced by the demo recipes. synth_sets TASK [SYNTH OPTION...]: sets TRAIN_DATA and HOLDOUT_DATA and synthesises
# each that is missing (training set seed 1 with N_TRAIN studies, hold-out seed 2 with N_HOLDOUT, WORKERS processes,
# plus the given `synth` options). Folders named in TRAIN_DATA / HOLDOUT_DATA are reused; the defaults
# OUT/train_data and OUT/holdout_data are removed first, so they are always synthesised afresh.
synth_sets() {
  local task=$1
  shift
  [ -n "${TRAIN_DATA:-}" ] || rm -rf "$OUT/train_data"
  [ -n "${HOLDOUT_DATA:-}" ] || rm -rf "$OUT/holdout_data"
  TRAIN_DATA=${TRAIN_DATA:-$OUT/train_data}
  HOLDOUT_DATA=${HOLDOUT_DATA:-$OUT/holdout_data}
  [ -d "$TRAIN_DATA" ] || "$PY" -m training.cli synth "$task" --out "$TRAIN_DATA" --n "$N_TRAIN" --seed 1 \
      --workers "$WORKERS" "$@"
  [ -d "$HOLDOUT_DATA" ] || "$PY" -m training.cli synth "$task" --out "$HOLDOUT_DATA" --n "$N_HOLDOUT" --seed 2 \
      --workers "$WORKERS" "$@"
}
