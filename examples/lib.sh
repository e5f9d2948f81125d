# Shared by the example pipelines (sourced, not run): thread count, the `undo` command, and the
# numbered stage lines. Set STAGE_COUNT before the first `stage`.

usable_cores() {  # CPU affinity (nproc), capped by a cgroup v2 CPU quota if there is one
  local n quota period
  n=$(nproc)
  if [ -r /sys/fs/cgroup/cpu.max ] && read -r quota period < /sys/fs/cgroup/cpu.max \
     && [ "$quota" != max ]; then
    quota=$(( (quota + period - 1) / period )); [ "$quota" -lt "$n" ] && n=$quota
  fi
  echo "$n"
}

# UNDO=COMMAND runs every `undo` through COMMAND (the test suite's warm server).
undo() { if [ -n "${UNDO:-}" ]; then $UNDO "$@"; else command undo "$@"; fi; }

STARTED=$SECONDS
STAGE_NO=0
stage() {  # a numbered progress line per stage, with the wall time so far
  STAGE_NO=$((STAGE_NO + 1))
  local t=$((SECONDS - STARTED))
  printf '== [%d/%d] %s  (%dm%02ds so far)\n' "$STAGE_NO" "$STAGE_COUNT" "$1" $((t / 60)) \
    $((t % 60)) >&2
}

finish_report() {  # finish_report LABEL=RESULTS...: the report into $OUT/report, and the wall time
  stage "report"
  undo report "$@" --out "$OUT/report" --overwrite
  local t=$((SECONDS - STARTED))
  echo "report: $OUT/report/report.md (demo wall time $((t / 60))m$((t % 60))s)" >&2
}
