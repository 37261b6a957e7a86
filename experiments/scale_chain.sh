#!/usr/bin/env bash
# ProsQA's recipes of issue "models that learn" from random initialisation with the token shift,
# on one GPU in about 22 minutes, each run alone on the GPU with every core but one generating
# its data (sharing the GPU and its cores three ways, a CoT run made 2.3 steps per second, alone
# 19: docs/results.md). First, for TRAIN_MINUTES (default 10):
#   prosqa-cot      prosqa_cot.yaml (qwen3-12x384, 3 epochs of small and 3 of mid-sized graphs,
#                   then Coconut's sizes, 15-25 concepts and 3-6 hops; an epoch is 200 steps)
# then, one after another, from the CoT model:
#   prosqa-nocot-from-cot   prosqa_nocot_from_cot.yaml for NOCOT_MINUTES (default 3): No-CoT
#                           fine-tuned from the CoT model (a model trained on answers alone from
#                           random init stays at guessing)
#   prosqa-coconut          prosqa_coconut.yaml for COCONUT_MINUTES (default 6), up to 100
#                           steps of 128 graphs per stage, compiled layer by layer unless
#                           COCONUT_COMPILE=false (later stages compile nothing new, but the
#                           first two compile for minutes); its step is several times CoT's per
#                           token, so stages 1-5 end at a tenth of the time each at the latest
#                           (train.stages_by_time) and stage 6 gets the rest
# Countdown and the text Base: experiments/countdown_text_chain.sh. Each command's wall time (s)
# and exit status go to OUT/times.tsv, its output to OUT/NAME.log.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/scale_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: scale_chain.sh OUT [overrides]}"
shift
W=${WORKERS:-}  # empty: the engine's default, every core but one
run prosqa-cot prosqa_cot train.max_time="${TRAIN_MINUTES:-10}" "$@"

run prosqa-nocot-from-cot prosqa_nocot_from_cot model.init_from="$R/prosqa-cot" \
  train.max_time="${NOCOT_MINUTES:-3}" "$@"
# 128 in one micro-batch took about 70 GB by stage 4 on an H200; a smaller card takes 64 x 2
big=$(python3 -c "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 100e9)")
[ "$big" = True ] && micro=() || micro=(train.batch_size=64 train.grad_accum=2)
run prosqa-coconut prosqa_coconut model.init_from="$R/prosqa-cot" \
  model.compile="${COCONUT_COMPILE:-true}" train.max_time="${COCONUT_MINUTES:-6}" "${micro[@]}" "$@"
cat "$R/times.tsv"
