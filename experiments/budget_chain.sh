#!/usr/bin/env bash
# Every pipeline at a reduced budget, about 15 minutes of one H100: the benchmarks alone first
# (clean timings), then three chains sharing the GPU:
#   ProsQA:    CoT (1,500 steps) -> Coconut through all 6 stages (1 epoch each, 8,000 examples)
#   Countdown: CoT (1,500 steps) -> Latent-SFT encoder (1+1+2 epochs) -> latent LM (3 epochs)
#   sweep:     configs/sweeps/methods_nl4.yaml (No-CoT Bases, then pause/soft/Liu/H1/H2 at N_L=4)
# then the analyses and the report. Each command's wall time (s) and exit status go to OUT/times.tsv.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/budget_chain.sh OUT [key=value ...]
# Extra key=value overrides reach every run (a CPU smoke test: model.name=gpt2-tiny ...).
set -uo pipefail
R=${1:?usage: budget_chain.sh OUT [overrides]}
shift
mkdir -p "$R"
source "$(dirname "$0")/timed.sh"

if [[ -z "${SKIP_BENCHMARKS:-}" ]]; then
  timed bench_methods python3 benchmarks/methods.py --out "$R/bench_methods.json" ${BENCH_ARGS:-}
  timed bench_coconut python3 benchmarks/coconut_step.py --out "$R/bench_coconut.json" \
    ${BENCH_ARGS:-}
fi

(
  timed prosqa-cot ll train configs/prosqa_cot.yaml train.max_steps=1500 \
    "out_dir=$R/prosqa-cot" "$@" &&
  timed prosqa-coconut ll train configs/prosqa_coconut.yaml "model.init_from=$R/prosqa-cot" \
    task.n_train=8000 method.epochs_per_stage=1 train.epochs=7 train.grad_accum=1 \
    "out_dir=$R/prosqa-coconut" "$@"
) &
(
  timed countdown-cot ll train configs/countdown_cot.yaml model.name=gpt2-small \
    train.batch_size=64 train.max_steps=1500 "out_dir=$R/countdown-cot" "$@" &&
  timed countdown-latent_sft_encoder ll train configs/countdown_latent_sft_encoder.yaml \
    model.name=gpt2-small train.batch_size=64 "model.init_from=$R/countdown-cot" \
    "method.schedule_epochs=[1,1,2]" "out_dir=$R/countdown-latent_sft_encoder" "$@" &&
  timed countdown-latent_sft ll train configs/countdown_latent_sft.yaml \
    model.name=gpt2-small train.batch_size=64 \
    "model.init_from=$R/countdown-latent_sft_encoder" \
    "method.encoder_from=$R/countdown-latent_sft_encoder" \
    "method.schedule_epochs=[1,1,2]" train.epochs=3 "out_dir=$R/countdown-latent_sft" "$@"
) &
timed sweep ll sweep configs/sweeps/methods_nl4.yaml "$@" --out-dir "$R/sweep" &
wait

for run in sweep/prosqa_nocot-liu sweep/prosqa_nocot-h1 sweep/countdown_nocot-h1 \
           prosqa-coconut countdown-latent_sft; do
  [[ -f "$R/$run/results.json" ]] &&
    timed "analyze-${run//\//_}" ll analyze "$R/$run" --n 300
done
timed report ll report "$R/sweep" "$R"/prosqa-cot "$R"/prosqa-coconut "$R"/countdown-cot \
  "$R"/countdown-latent_sft --out "$R/report"
cat "$R/times.tsv"
