#!/usr/bin/env bash
# The first phase of experiments/scale_chain.sh as it ran (TRAIN_MINUTES=7 SMALL_EPOCHS=2
# MID_EPOCHS=2): ProsQA CoT alone on the GPU, with a third curriculum stage of 12-20 concepts
# and 2-5 hops that lasted the rest of the run (the scale chain now ends its curriculum at
# Coconut's sizes, 15-25 concepts and 3-6 hops). From the repository's root:
#   LATENTLAB_SHARED=/path/to/shared bash experiments/results/2026-12-05-h100-prosqa-cot-alone/chain.sh OUT
set -uo pipefail
source experiments/timed.sh
chain_setup "${1:?usage: chain.sh OUT [overrides]}"
shift
rope=(model.name=qwen3-12x384 "model.preset_overrides={}")  # the recipe's model as it ran
W=${WORKERS:-}  # alone on the machine: the engine's default, every core but one
run prosqa-cot prosqa_cot "${rope[@]}" "task.curriculum=[{epochs: 2, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: 2, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}, {epochs: 1000, min_concepts: 12, max_concepts: 20, min_hops: 2, max_hops: 5}]" \
  train.eval_every=1000 model.compile_scope=layers train.max_time=7 "$@"
cat "$R/times.tsv"
