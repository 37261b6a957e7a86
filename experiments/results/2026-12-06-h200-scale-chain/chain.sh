#!/usr/bin/env bash
# experiments/scale_chain.sh as it ran (TRAIN_MINUTES=8 NOCOT_MINUTES=3 COCONUT_MINUTES=5, one
# H200, so Coconut in micro-batches of 128 x 2): ProsQA CoT from random initialisation with the
# recipe of configs/prosqa_cot.yaml, then No-CoT and Coconut (compiled) fine-tuned from it, one
# run at a time. From the repository's root:
#   LATENTLAB_SHARED=/path/to/shared bash experiments/results/2026-12-06-h200-scale-chain/chain.sh OUT
set -uo pipefail
source experiments/timed.sh
chain_setup "${1:?usage: chain.sh OUT [overrides]}"
shift
W=${WORKERS:-}  # alone on the machine: the engine's default, every core but one
run prosqa-cot prosqa_cot train.max_time="${TRAIN_MINUTES:-8}" "$@"

run prosqa-nocot-from-cot prosqa_nocot_from_cot model.init_from="$R/prosqa-cot" \
  train.max_time="${NOCOT_MINUTES:-3}" "$@"
# 128 x 2 took about 70 GB by stage 4 on an H200; a smaller card takes 64 x 4
big=$(python3 -c "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 100e9)")
[ "$big" = True ] && micro=(train.batch_size=128 train.grad_accum=2) || micro=(train.batch_size=64 train.grad_accum=4)
run prosqa-coconut prosqa_coconut model.init_from="$R/prosqa-cot" \
  model.compile=true train.max_time="${COCONUT_MINUTES:-5}" task.n_train=12800 "${micro[@]}" "$@"
cat "$R/times.tsv"
