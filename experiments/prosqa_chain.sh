#!/usr/bin/env bash
# Generated ProsQA with the GPT-2 small shape from random init, about 20 minutes of one H100:
# the CoT and No-CoT Bases with the loss on the question too (method.question_loss), then, on
# the same GPU at once,
#   CoT Base    -> Coconut from stage 1 (stage 0 is the CoT Base), 1 epoch per stage
#   No-CoT Base -> pause, soft embedding, Liu, H1 and H2 at N_L = 4
# then the analyses and the report. Each command's wall time (s) and exit status go to
# OUT/times.tsv.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/prosqa_chain.sh OUT [key=value ...]
# Extra key=value overrides reach every run (a CPU smoke test: model.name=gpt2-tiny ...).
# BASE_EPOCHS (default 8), METHOD_STEPS (200) and COCONUT_TRAIN (3000 examples) size it:
# the defaults are those of the ProsQA table of docs/results.md.
set -uo pipefail
R=${1:?usage: prosqa_chain.sh OUT [overrides]}
shift
mkdir -p "$R"
E=${BASE_EPOCHS:-8}
source "$(dirname "$0")/timed.sh"

(
  timed prosqa-cot ll train configs/prosqa_cot.yaml "train.epochs=$E" \
    "out_dir=$R/prosqa-cot" "$@" &&
  timed prosqa-coconut ll train configs/prosqa_coconut.yaml "model.init_from=$R/prosqa-cot" \
    "task.n_train=${COCONUT_TRAIN:-3000}" method.first_stage=1 method.epochs_per_stage=1 \
    train.epochs=6 train.grad_accum=1 "out_dir=$R/prosqa-coconut" "$@"
) &
(
  timed prosqa-nocot ll train configs/prosqa_nocot.yaml "train.epochs=$E" \
    "out_dir=$R/prosqa-nocot" "$@" &&
  method() {
    timed "prosqa-$1" ll train "configs/prosqa_$1.yaml" "model.init_from=$R/prosqa-nocot" \
      "train.max_steps=${METHOD_STEPS:-200}" "out_dir=$R/prosqa-$1" "${@:2}"
  }
  # Two waves: pause, soft and H2 take ~21 GB each at batch 64 next to Coconut's ~8 GB, and
  # six processes at once ran out of the H100's 80 GB.
  for m in liu h1 pause soft; do method "$m" "$@" & done
  wait
  method h2 "$@"
) &
wait

for run in prosqa-liu prosqa-h1 prosqa-coconut; do
  [[ -f "$R/$run/results.json" ]] && timed "analyze-$run" ll analyze "$R/$run" --n 300
done
timed report ll report "$R"/prosqa-*/ --out "$R/report"
cat "$R/times.tsv"
