#!/usr/bin/env bash
# The first phase of experiments/scale_chain.sh cut to three runs sharing one GPU for
# TRAIN_MINUTES: ProsQA CoT qwen3-12x384 with 3 epochs on small and 3 on mid-sized graphs
# first, Countdown-3 CoT, Countdown-4 CoT.
#   LATENTLAB_SHARED=/path/to/shared bash short_chain.sh OUT [key=value ...]
set -uo pipefail
source experiments/timed.sh
chain_setup "$1"
shift
rope=(model.name=qwen3-12x384 "model.preset_overrides={}")  # the recipe's model as it ran
minutes=train.max_time=${TRAIN_MINUTES:-10}
long="task.curriculum=[{epochs: 3, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: 3, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}, {epochs: 1000, min_concepts: 12, max_concepts: 20, min_hops: 2, max_hops: 5}]"
run prosqa-cot-12x384-long prosqa_cot "${rope[@]}" "$long" train.eval_every=1000 "$minutes" "$@" &
run countdown3-cot countdown3_cot "$minutes" "$@" &
W=$((2 * W)) run countdown4-cot countdown4_cot "$minutes" "$@" &
wait
cat "$R/times.tsv"
