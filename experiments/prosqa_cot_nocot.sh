#!/usr/bin/env bash
# Issue 2's GPU run: CoT and No-CoT on generated ProsQA (17,886 train), GPT-2 small shape from
# random init with GPT-2's BPE, model selection on a generated valid split, final score on
# Coconut's prosqa_valid.json. Both runs share one GPU (GPT-2 small leaves most of it idle).
#   LATENTLAB_SHARED=/path/to/shared bash experiments/prosqa_cot_nocot.sh OUT_DIR [key=value ...]
set -euo pipefail
out=${1:?usage: prosqa_cot_nocot.sh OUT_DIR [overrides]}
shift
mkdir -p "$out"
for method in cot nocot; do
  python3 -m latentlab train "configs/prosqa_${method}.yaml" "out_dir=$out/prosqa-$method" "$@" \
    > "$out/prosqa-$method.log" 2>&1 &
done
wait
for method in cot nocot; do tail -n 1 "$out/prosqa-$method.log"; done
