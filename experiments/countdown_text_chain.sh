#!/usr/bin/env bash
# Countdown's CoT recipes and the text Base of the Coprocessor runs, from random
# initialisation, sharing one GPU for TRAIN_MINUTES (default 10) each, about 13 minutes:
#   countdown3-cot, countdown4-cot   countdown3_cot.yaml, countdown4_cot.yaml with the token
#                                    shift; their steps wait for generated problems, so they
#                                    share the cores (less one for the text run) as data workers
#   text-nocot                       text_nocot.yaml (GPT-2 small on the Gutenberg corpus): its
#                                    validation perplexity and tokens/s after TRAIN_MINUTES
# ProsQA: experiments/scale_chain.sh. Each command's wall time (s) and exit status go to
# OUT/times.tsv, its output to OUT/NAME.log.
#   LATENTLAB_SHARED=/path/to/shared bash experiments/countdown_text_chain.sh OUT [key=value ...]
set -uo pipefail
source "$(dirname "$0")/timed.sh"
chain_setup "${1:?usage: countdown_text_chain.sh OUT [overrides]}"
shift
minutes=train.max_time=${TRAIN_MINUTES:-10}
cores=$(getconf _NPROCESSORS_ONLN)  # not nproc, which follows OMP_NUM_THREADS
W=${WORKERS:-$(( cores > 5 ? (cores - 4) / 2 : 1 ))}  # 3 main processes, 1 text worker
layers=model.compile_scope=layers  # as in scale_chain.sh: compiling takes a fraction of the time
run countdown3-cot countdown3_cot "$minutes" $layers "$@" &
run countdown4-cot countdown4_cot "$minutes" $layers "$@" &
W=1 run text-nocot text_nocot train.epochs=100 "$minutes" "$@" &
wait
cat "$R/times.tsv"
