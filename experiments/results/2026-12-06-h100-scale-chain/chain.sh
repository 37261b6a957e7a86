#!/usr/bin/env bash
# experiments/scale_chain.sh as it ran (TRAIN_MINUTES=6 NOCOT_MINUTES=2 COCONUT_MINUTES=2, one
# H100, so Coconut in micro-batches of 64 x 4): ProsQA CoT from random initialisation, then
# No-CoT and Coconut fine-tuned from it, one run at a time. From the repository's root:
#   LATENTLAB_SHARED=/path/to/shared bash experiments/results/2026-12-06-h100-scale-chain/chain.sh OUT
set -uo pipefail
source experiments/timed.sh
chain_setup "${1:?usage: chain.sh OUT [overrides]}"
shift
W=${WORKERS:-}  # alone on the machine: the engine's default, every core but one
rope=(model.name=qwen3-12x384 "model.preset_overrides={}")
run prosqa-cot prosqa_cot "${rope[@]}" "task.curriculum=[{epochs: 3, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: 3, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}]" \
  train.eval_every=1000 model.compile_scope=layers train.max_time=6 "$@"
run prosqa-nocot-from-cot prosqa_nocot_from_cot "${rope[@]}" model.init_from="$R/prosqa-cot" \
  model.compile_scope=layers train.max_time=2 "$@"
run prosqa-coconut prosqa_coconut "${rope[@]}" model.init_from="$R/prosqa-cot" train.max_time=2 \
  task.n_train=12800 train.batch_size=64 train.grad_accum=4 "$@"
cat "$R/times.tsv"
