# Shared by the chain scripts: `ll` runs latentlab; `timed NAME CMD...` runs CMD with its
# output in $R/NAME.log and appends NAME, seconds and exit status to $R/times.tsv.
ll() { python3 -m latentlab "$@"; }
timed() {  # timed NAME COMMAND...: run, log to R/NAME.log, record seconds and exit status
  local name=$1 start=$SECONDS rc
  shift
  "$@" > "$R/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$rc" >> "$R/times.tsv"
  return $rc
}
# The from-scratch chains share their start: OUT made, runs sharing one GPU with expandable
# segments (each run keeps a cache of freed blocks; without, a fifth run found no memory left
# on an H200), and `run NAME CONFIG [overrides]`, which trains configs/CONFIG.yaml into OUT/NAME
# with $W data workers (WORKERS, default 2; empty: the engine's default, every core but one).
chain_setup() {  # chain_setup OUT
  R=$1
  mkdir -p "$R"
  W=${WORKERS:-2}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
}
run() {  # run NAME CONFIG [overrides]: train the config into R/NAME
  timed "$1" ll train "configs/$2.yaml" "out_dir=$R/$1" ${W:+"train.data_workers=$W"} "${@:3}"
}
