#!/usr/bin/env bash
# Latent-SFT's pipeline alone (about 10 minutes of one H100): on generated Countdown (4
# operands) with the GPT-2 small preset,
#   CoT Base (1,500 steps) -> Latent-SFT stage 1, encoder (1+1+2 epochs)
#                          -> stage 2, latent LM (3 epochs, soft labels from that encoder)
# then `latentlab analyze` on 300 test examples (#L against CoT length, ECR@50, N_eff, the
# decoded latents). Each command's wall time (s) and exit status go to OUT/times.tsv.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/latent_sft_chain.sh OUT [key=value ...]
# Extra key=value overrides reach every run (a CPU smoke test: model.name=gpt2-tiny ...).
set -uo pipefail
R=${1:?usage: latent_sft_chain.sh OUT [overrides]}
shift
mkdir -p "$R"
source "$(dirname "$0")/timed.sh"
common=(model.name=gpt2-small train.batch_size=64)

timed countdown-cot ll train configs/countdown_cot.yaml "${common[@]}" train.max_steps=1500 \
  "out_dir=$R/countdown-cot" "$@" &&
timed countdown-latent_sft_encoder ll train configs/countdown_latent_sft_encoder.yaml \
  "${common[@]}" "model.init_from=$R/countdown-cot" "method.schedule_epochs=[1,1,2]" \
  "out_dir=$R/countdown-latent_sft_encoder" "$@" &&
timed countdown-latent_sft ll train configs/countdown_latent_sft.yaml "${common[@]}" \
  "model.init_from=$R/countdown-latent_sft_encoder" \
  "method.encoder_from=$R/countdown-latent_sft_encoder" train.epochs=3 \
  "out_dir=$R/countdown-latent_sft" "$@" &&
timed analyze-countdown-latent_sft ll analyze "$R/countdown-latent_sft" --split test --n 300
cat "$R/times.tsv"
