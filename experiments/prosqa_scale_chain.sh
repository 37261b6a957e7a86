#!/usr/bin/env bash
# ProsQA from random initialisation with the recipes' token shift (configs/prosqa_cot.yaml), at
# three model sizes, one control without the shift, and Countdown-4 CoT with the shift, all
# sharing one GPU for TRAIN_MINUTES (default 10) each; scored on Coconut's prosqa_valid.json:
#   prosqa-cot-2x128-small          Qwen-3 blocks 2 x 128, graphs of 4-6 concepts, 1-2 hops only
#   prosqa-cot-2x128-small-noshift  the same with model.token_shift=0
#   prosqa-cot-4x256                4 x 256, a long curriculum from small graphs to Coconut's
#   prosqa-cot-12x384               qwen3-12x384, the short curriculum (`small_first`, timed.sh)
#   prosqa-nocot-12x384             the same shape and curriculum, No-CoT
#   countdown4-cot                  countdown4_cot.yaml (with the token shift)
# then, for METHOD_MINUTES (default 6) each, from the best model of prosqa-cot-12x384:
#   prosqa-nocot-from-cot-12x384    No-CoT fine-tuned from the CoT model (on small graphs a
#                                   model trained on answers alone stays at guessing)
#   prosqa-coconut-12x384           prosqa_coconut.yaml
#   LATENTLAB_SHARED=/path/to/shared bash experiments/prosqa_scale_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: prosqa_scale_chain.sh OUT [overrides]}"
shift
minutes=train.max_time=${TRAIN_MINUTES:-10}
small="{num_hidden_layers: 2, hidden_size: 128, num_attention_heads: 4, num_key_value_heads: 4, head_dim: 32, intermediate_size: 384}"
medium="{num_hidden_layers: 4, hidden_size: 256, num_attention_heads: 4, num_key_value_heads: 4, head_dim: 64, intermediate_size: 768}"
long_curriculum="task.curriculum=[{epochs: 10, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: 10, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}, {epochs: 10, min_concepts: 12, max_concepts: 20, min_hops: 2, max_hops: 5}]"

small_graphs=("task.curriculum=[]" task.min_concepts=4 task.max_concepts=6 task.min_hops=1
              task.max_hops=2 train.eval_every=2000)
run prosqa-cot-2x128-small prosqa_cot "${rope[@]}" "model.preset_overrides=$small" \
  "${small_graphs[@]}" "$minutes" "$@" &
run prosqa-cot-2x128-small-noshift prosqa_cot "${rope[@]}" "model.preset_overrides=$small" \
  "${small_graphs[@]}" model.token_shift=0 "$minutes" "$@" &
run prosqa-cot-4x256 prosqa_cot "${rope[@]}" "model.preset_overrides=$medium" "$long_curriculum" \
  train.eval_every=2000 "$minutes" "$@" &
run prosqa-cot-12x384 prosqa_cot "${rope[@]}" "$small_first" train.eval_every=1000 \
  "$minutes" "$@" &
run prosqa-nocot-12x384 prosqa_nocot "${rope[@]}" "$small_first" train.eval_every=1000 \
  "$minutes" "$@" &
run countdown4-cot countdown4_cot "$minutes" "$@" &
wait
method_minutes=train.max_time=${METHOD_MINUTES:-6}
from_cot=(model.init_from="$R/prosqa-cot-12x384" "task.curriculum=[]" "$method_minutes")
run prosqa-nocot-from-cot-12x384 prosqa_nocot "${rope[@]}" "${from_cot[@]}" train.lr=3e-4 \
  train.schedule=constant train.warmup_steps=0 "$@" &
run prosqa-coconut-12x384 prosqa_coconut "${rope[@]}" "${from_cot[@]}" "$@" &
wait
cat "$R/times.tsv"
