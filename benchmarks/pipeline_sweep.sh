#!/usr/bin/env bash
# Variants of examples/arithmetic.sh side by side: base, oracle and the unlearned model are made
# once, then each variant (perturb -> distill -> attacks -> report) runs in parallel on its own
# cores. Used to choose the pipeline's defaults (docs/benchmarks.md, "arithmetic pipeline").
#   VARIANTS="a:ALPHA=0.6 b:ALPHA=0.8,DISTILL_DATA=retain" bash benchmarks/pipeline_sweep.sh
set -euo pipefail
ROOT="${ROOT:-runs/sweep}"
VARIANTS="${VARIANTS:-a06:ALPHA=0.6 a08:ALPHA=0.8}"
THREADS="${THREADS:-2}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
start=$(date +%s)
OUT="$ROOT/shared" STAGES=prepare bash examples/arithmetic.sh
echo "prepare: $(( $(date +%s) - start )) s" >&2
pids=()
for variant in $VARIANTS; do
  name="${variant%%:*}"; settings="${variant#*:}"
  dir="$ROOT/$name"; mkdir -p "$dir"
  for part in data base oracle unlearned; do ln -sfn "$(cd "$ROOT/shared" && pwd)/$part" "$dir/$part"; done
  ( export OUT="$dir" STAGES=undo
    IFS=','; for kv in $settings; do export "${kv?}"; done; unset IFS
    t0=$(date +%s)
    bash examples/arithmetic.sh > "$dir/log.txt" 2>&1
    echo "$name: $(( $(date +%s) - t0 )) s" >> "$dir/log.txt" ) & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for variant in $VARIANTS; do
  name="${variant%%:*}"
  echo "=== $variant"; tail -n 1 "$ROOT/$name/log.txt"
  cat "$ROOT/$name/report/report.md" 2>/dev/null | sed -n '/^| model/,/^$/p'
done
echo "total: $(( $(date +%s) - start )) s"
exit "$status"
