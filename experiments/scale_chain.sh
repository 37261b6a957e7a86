#!/usr/bin/env bash
# Every task of issue "models that learn" from random initialisation with the recipes' token
# shift, on one GPU in about 19 minutes. First, sharing the GPU for TRAIN_MINUTES (default 10):
#   prosqa-cot-12x384          prosqa_cot.yaml, qwen3-12x384, the short curriculum (`small_first`)
#   prosqa-cot-12x384-long     the same with three times as many steps on small graphs first
#   prosqa-cot-4x256           Qwen-3 blocks 4 x 256, a long curriculum from small graphs
#   countdown3-cot, countdown4-cot   countdown3_cot.yaml, countdown4_cot.yaml
#   text-nocot                 text_nocot.yaml: GPT-2 small on the Gutenberg corpus (perplexity)
# then, for METHOD_MINUTES (default 7) each, from whichever 12 x 384 CoT model scores higher on
# the generated valid split (prosqa_valid.json, the test file, is never read to choose):
#   prosqa-nocot-from-cot      No-CoT fine-tuned from the CoT model (a model trained on answers
#                              alone from random init stays at guessing: docs/results.md)
#   prosqa-coconut             prosqa_coconut.yaml, 50 steps per stage so all six stages fit
# Each command's wall time (s) and exit status go to OUT/times.tsv, its output to OUT/NAME.log.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/scale_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: scale_chain.sh OUT [overrides]}"
shift
minutes=train.max_time=${TRAIN_MINUTES:-10}
medium="{num_hidden_layers: 4, hidden_size: 256, num_attention_heads: 4, num_key_value_heads: 4, head_dim: 64, intermediate_size: 768}"
curriculum() {  # curriculum SMALL MID: epochs on small, then mid-sized graphs, then Coconut's sizes
  echo "task.curriculum=[{epochs: $1, min_concepts: 4, max_concepts: 8, min_hops: 1, max_hops: 2}, {epochs: $2, min_concepts: 8, max_concepts: 14, min_hops: 1, max_hops: 4}, {epochs: 1000, min_concepts: 12, max_concepts: 20, min_hops: 2, max_hops: 5}]"
}

run prosqa-cot-12x384 prosqa_cot "${rope[@]}" "$small_first" train.eval_every=1000 \
  "$minutes" "$@" &
run prosqa-cot-12x384-long prosqa_cot "${rope[@]}" "$(curriculum 3 3)" train.eval_every=1000 \
  "$minutes" "$@" &
run prosqa-cot-4x256 prosqa_cot "${rope[@]}" "model.preset_overrides=$medium" \
  "$(curriculum 4 4)" train.eval_every=1000 "$minutes" "$@" &
run countdown3-cot countdown3_cot "$minutes" "$@" &
W=$((2 * W)) run countdown4-cot countdown4_cot "$minutes" "$@" &
run text-nocot text_nocot train.epochs=100 train.eval_every=1000 "$minutes" "$@" &
wait

base=$(python3 - "$R/prosqa-cot-12x384" "$R/prosqa-cot-12x384-long" <<'PY'
import json, pathlib, sys
def valid(run):  # a run that failed has no results.json and is never chosen
    path = pathlib.Path(run, "results.json")
    return json.loads(path.read_text())["valid"]["accuracy"] if path.exists() else -1.0
print(max(sys.argv[1:], key=valid))
PY
)
echo "Base of the methods: $base" | tee "$R/base.txt"
method_minutes=train.max_time=${METHOD_MINUTES:-7}
from_cot=(model.init_from="$base" "task.curriculum=[]" "$method_minutes")
run prosqa-nocot-from-cot prosqa_nocot "${rope[@]}" "${from_cot[@]}" train.lr=3e-4 \
  train.schedule=constant train.warmup_steps=0 "$@" &
# 128 x 2 took about 70 GB by stage 4 on an H200; a smaller card takes 64 x 4
big=$(python3 -c "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 100e9)")
[ "$big" = True ] && micro=(train.batch_size=128 train.grad_accum=2) || micro=(train.batch_size=64 train.grad_accum=4)
run prosqa-coconut prosqa_coconut "${rope[@]}" "${from_cot[@]}" task.n_train=12800 "${micro[@]}" "$@" &
wait
cat "$R/times.tsv"
