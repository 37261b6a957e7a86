#!/usr/bin/env bash
# Countdown's CoT recipes and the text Base of the Coprocessor runs, from random
# initialisation, one after another, each alone on the GPU with every core but one making its
# data, about 21 minutes. Sharing one GPU and its 16 cores three ways, a ProsQA CoT run made
# 2.3 steps per second; alone, 19 on the same graphs (docs/results.md).
#   countdown3-cot   countdown3_cot.yaml with the token shift, COUNTDOWN_MINUTES (default 4)
#   countdown4-cot   countdown4_cot.yaml, the same
#   text-nocot       text_nocot.yaml (GPT-2 small on the Gutenberg corpus) for TEXT_MINUTES
#                    (default 10): its validation perplexity and tokens/s
# ProsQA: experiments/scale_chain.sh. Each command's wall time (s) and exit status go to
# OUT/times.tsv, its output to OUT/NAME.log.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/countdown_text_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: countdown_text_chain.sh OUT [overrides]}"
shift
W=${WORKERS:-}  # alone on the machine: the engine's default, every core but one
layers=model.compile_scope=layers  # as in scale_chain.sh: compiling takes a fraction of the time
run countdown3-cot countdown3_cot $layers train.max_time="${COUNTDOWN_MINUTES:-4}" "$@"
run countdown4-cot countdown4_cot $layers train.max_time="${COUNTDOWN_MINUTES:-4}" "$@"
run text-nocot text_nocot $layers train.epochs=100 train.max_time="${TEXT_MINUTES:-10}" "$@"
cat "$R/times.tsv"
