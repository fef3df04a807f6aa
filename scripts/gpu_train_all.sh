#!/usr/bin/env bash
# Train all five demo bundles at once on one GPU machine (16 cores), each task by its own recipe in
# scripts/train_demo/<task>.sh, then pack bundles + evaluations into OUT_DIR.
#
#   scripts/gpu_train_all.sh OUT_DIR
#
# Every recipe runs under `timeout` (BUDGET_S each) so that a slow one cannot take the others down; sizes per task
# come from the variables below (override from the environment). Python: $PYTHON (default python3) with the repo
# on PYTHONPATH, which is how it runs on a machine without the project's venv.
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
export PYTHON=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
work=${WORK:-/tmp/demo_train}
mkdir -p "$work"

run() {  # task N_TRAIN N_HOLDOUT EPOCHS WORKERS
  local task=$1
  ( export N_TRAIN=$2 N_HOLDOUT=$3 EPOCHS=$4 WORKERS=$5 DEVICE=${DEVICE:-cuda}
    timeout "$BUDGET_S" bash "scripts/train_demo/$task.sh" "$work/$task" >"$work/$task.log" 2>&1
    echo "$task exit $?" >>"$work/status.txt" ) &
}
run wrist_fracture  "${WRIST_N:-2000}"  "${WRIST_H:-300}"  "${WRIST_E:-12}"  "${WRIST_W:-5}"
run physis_fracture "${PHYSIS_N:-1200}" "${PHYSIS_H:-300}" "${PHYSIS_E:-12}" "${PHYSIS_W:-4}"
run spine_bmd       "${SPINE_N:-160}"   "${SPINE_H:-40}"   "${SPINE_E:-15}"  "${SPINE_W:-2}"
run hrpqct_motion   "${HRP_N:-400}"     "${HRP_H:-100}"    "${HRP_E:-30}"    "${HRP_W:-3}"
run knee_bone_seg   "${KNEE_N:-60}"     "${KNEE_H:-12}"    "${KNEE_E:-40}"   "${KNEE_W:-2}"
wait
cat "$work/status.txt"
# pack: bundles and evaluation reports (no data), split in 15 MB pieces for the transfer limits
tar -C "$work" -czf "$OUT/demo_bundles.tgz" \
  $(cd "$work" && ls -d */bundle */eval 2>/dev/null) $(cd "$work" && ls *.log status.txt)
split -b 15m "$OUT/demo_bundles.tgz" "$OUT/demo_bundles.tgz.part-" && rm "$OUT/demo_bundles.tgz"
ls -la "$OUT"
