# Sourced by the demo recipes. With DEADLINE (unix seconds) set, prints the `train` option that stops training in
# time for the hold-out evaluation (EVAL_RESERVE_S seconds, default 150) to finish before the deadline: for a
# borrowed GPU machine whose lease ends at a fixed time. Prints nothing without DEADLINE.
budget_args() {
  [ -n "${DEADLINE:-}" ] || return 0
  local left=$(( DEADLINE - $(date +%s) - ${EVAL_RESERVE_S:-150} ))
  [ "$left" -ge 30 ] || left=30
  echo "--set time_budget_s=$left"
}
