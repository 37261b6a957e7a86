#!/usr/bin/env bash
# The from-scratch recipes of configs/, end to end on one GPU in about 17 minutes, the runs
# sharing the GPU:
#   ProsQA CoT Base (8 min)    -> Coconut (7 min)
#   ProsQA No-CoT Base (8 min) -> pause, soft embedding (3 min each, at once)
#   Countdown CoT, 3 numbers (8 min);  Countdown CoT, 4 numbers (8 min)
# Every run scores its best model (selected on generated valid data) on its test split at the
# end: Coconut's prosqa_valid.json for ProsQA, held-out targets for Countdown. Each command's
# wall time (s) and exit status go to OUT/times.tsv, its output to OUT/NAME.log.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/learning_chain.sh OUT [key=value ...]
# Extra key=value overrides reach every run (a CPU smoke test: model.name=gpt2-tiny ...).
# WORKERS (default 2) sets the data workers of each run; Countdown-4's search takes twice that.
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: learning_chain.sh OUT [overrides]}"
shift

(
  run prosqa-cot prosqa_cot "$@" &&
  run prosqa-coconut prosqa_coconut "model.init_from=$R/prosqa-cot" "$@"
) &
(
  run prosqa-nocot prosqa_nocot "$@" &&
  for m in pause soft; do run "prosqa-$m" "prosqa_$m" "model.init_from=$R/prosqa-nocot" "$@" &
  done && wait
) &
run countdown3-cot countdown3_cot "$@" &
W=$((2 * W)) run countdown4-cot countdown4_cot "$@" &
wait
cat "$R/times.tsv"
