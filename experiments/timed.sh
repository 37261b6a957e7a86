# Shared by the session scripts: `ll` runs latentlab; `timed NAME CMD...` runs CMD with its
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
