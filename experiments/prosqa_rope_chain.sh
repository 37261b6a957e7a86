#!/usr/bin/env bash
# The ProsQA recipes on rotary positions (qwen3-12x384) with a curriculum that starts from
# graphs of 4-8 concepts (one or two hops), end to end on one GPU in about 20 minutes, the runs
# sharing the GPU:
#   ProsQA CoT Base (10 min)    -> Coconut (8 min)
#   ProsQA No-CoT Base (10 min) -> pause, soft embedding (3 min each, at once)
#   ProsQA CoT on gpt2-12x384 (10 min: the same recipe with learned positions)
#   Countdown CoT, 3 numbers (11 min)
#   LATENTLAB_SHARED=/path/to/shared bash experiments/prosqa_rope_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: prosqa_rope_chain.sh OUT [overrides]}"
shift
rope=(model.name=qwen3-12x384 "model.preset_overrides={}")
small_first="task.curriculum=[{epochs: 1, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: 1, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}, {epochs: 2, min_concepts: 12, max_concepts: 20, min_hops: 2, max_hops: 5}]"

(
  run prosqa-cot prosqa_cot "${rope[@]}" "$small_first" train.max_time=10 "$@" &&
  run prosqa-coconut prosqa_coconut "${rope[@]}" "model.init_from=$R/prosqa-cot" train.max_time=8 "$@"
) &
(
  run prosqa-nocot prosqa_nocot "${rope[@]}" "$small_first" train.max_time=10 "$@" &&
  for m in pause soft; do run "prosqa-$m" "prosqa_$m" "${rope[@]}" "model.init_from=$R/prosqa-nocot" "$@" &
  done && wait
) &
run prosqa-cot-gpt2 prosqa_cot "$small_first" train.max_time=10 "$@" &
run countdown3-cot countdown3_cot train.max_time=11 "$@" &
wait
cat "$R/times.tsv"
