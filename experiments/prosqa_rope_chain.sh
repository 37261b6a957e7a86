#!/usr/bin/env bash
# The ProsQA recipes on rotary positions (qwen3-12x384) with a curriculum that starts from
# graphs of 4-8 concepts (one or two hops), end to end on one GPU in about 20 minutes, the runs
# sharing the GPU:
#   ProsQA CoT Base (BASE_MINUTES, default 10)   -> Coconut (METHOD_MINUTES, default 8)
#   ProsQA No-CoT Base (BASE_MINUTES)            -> pause, soft embedding (3 min each, at once)
#   ProsQA CoT on 6 layers (BASE_MINUTES: twice the examples and steps of 12 layers)
#   Countdown CoT, 3 numbers (BASE_MINUTES)
#   LATENTLAB_SHARED=/path/to/shared bash experiments/prosqa_rope_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: prosqa_rope_chain.sh OUT [overrides]}"
shift
base=train.max_time=${BASE_MINUTES:-10}

(
  run prosqa-cot prosqa_cot "${rope[@]}" "$small_first" "$base" "$@" &&
  run prosqa-coconut prosqa_coconut "${rope[@]}" "model.init_from=$R/prosqa-cot" \
    "train.max_time=${METHOD_MINUTES:-8}" "$@"
) &
(
  run prosqa-nocot prosqa_nocot "${rope[@]}" "$small_first" "$base" "$@" &&
  for m in pause soft; do run "prosqa-$m" "prosqa_$m" "${rope[@]}" "model.init_from=$R/prosqa-nocot" "$@" &
  done && wait
) &
run prosqa-cot-6layers prosqa_cot "${rope[@]}" "$small_first" "$base" \
  "model.preset_overrides={num_hidden_layers: 6}" "$@" &
run countdown3-cot countdown3_cot "$base" "$@" &
wait
cat "$R/times.tsv"
