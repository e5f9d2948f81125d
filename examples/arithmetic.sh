#!/usr/bin/env bash
# UNDO on the paper's arithmetic task, end to end, on a laptop CPU (about 7.5 minutes on 2 quiet
# cores; see docs/benchmarks.md for how it varies with load and thread counts).
#
#   data -> init -> train base (retain + forget) -> train oracle (retain only, the
#   data-filtering gold standard) -> unlearn (MaxEnt) -> perturb (alpha 0.6, beta 0.1) ->
#   distill (until retain accuracy is back near the teacher's) -> relearning attack on base,
#   unlearned, UNDO and oracle with the same grid -> report
#
# Retain = addition/subtraction, forget = multiplication/division; metrics are greedy
# exact-match accuracy on held-out equations. Every knob below can be set from the
# environment, e.g. `OUT=runs/a2 ALPHA=0.8 bash examples/arithmetic.sh`. SMOKE=1 runs a
# seconds-long version with tiny budgets (what the test suite runs).
#
# SEEDS=3 runs the UNDO stages (perturb, distill) and all four attacks once per seed (SEED,
# SEED+1, ...) from the same base, unlearned and oracle models, and pools them in one report
# with 95% intervals (about 3 more minutes per extra seed). Seed SEED writes `undo` and
# `attacks/MODEL`, the others `undo-sK` and `attacks/MODEL-sK`.
#
# Every stage prints a numbered line with the time so far, and each command its own progress
# (a bar on a terminal, a line every LOG_EVERY steps otherwise; QUIET=1 keeps only the stage
# lines). THREADS (default: OMP_NUM_THREADS, else the usable cores: CPU affinity and any cgroup
# quota) sets the threads of every command. Base and oracle train side by side, splitting
# THREADS between them (so the cores are never oversubscribed; on 2 cores this is 2x faster than
# one after the other with 2 threads each: docs/benchmarks.md, "thread settings"); with one
# thread they train in turn. OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, which the
# CLI sets unless you set it): spinning threads collapse once anything else runs.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage, finish_report

OUT="${OUT:-runs/arithmetic}"
SEED="${SEED:-0}"
SEEDS="${SEEDS:-1}"                        # UNDO stages and attacks per seed, pooled in the report
ALPHA="${ALPHA:-0.6}"
BETA="${BETA:-0.1}"
PRESET="${PRESET:-tiny}"
BASE_STEPS="${BASE_STEPS:-2000}"          # pretraining budget of base and oracle
BASE_LR="${BASE_LR:-3e-3}"
UNLEARN_STEPS="${UNLEARN_STEPS:-100}"
DISTILL_MAX_STEPS="${DISTILL_MAX_STEPS:-1000}"
DISTILL_DATA="${DISTILL_DATA:-retain}"     # retain (the paper's choice) or all (retain + forget)
DISTILL_LR="${DISTILL_LR:-3e-3}"
ATTACK_STEPS="${ATTACK_STEPS:-100}"
ATTACK_LRS="${ATTACK_LRS:-1e-4,3e-4,1e-3}"
EVAL_EVERY="${EVAL_EVERY:-20}"
BATCH="${BATCH:-32}"
LENGTH="${LENGTH:-64}"
ATTACK_BATCH="${ATTACK_BATCH:-16}"
STAGES="${STAGES:-all}"                    # all, or "prepare" (up to unlearn) / "undo" (from perturb)
DATA_ARGS="${DATA_ARGS:-}"                 # extra options of `undo data arithmetic`
THREADS="${THREADS:-${OMP_NUM_THREADS:-$(usable_cores)}}"  # threads of every command
LOG_EVERY="${LOG_EVERY:-100}"              # progress line every N steps when not on a terminal
QUIET="${QUIET:-0}"                        # 1: only the stage lines
if [ "${SMOKE:-0}" = 1 ]; then
  BASE_STEPS=10 UNLEARN_STEPS=3 DISTILL_MAX_STEPS=4 ATTACK_STEPS=2 ATTACK_LRS=1e-3 EVAL_EVERY=2
  BATCH=4 ATTACK_BATCH=4 LENGTH=32 PRESET=tiny DATA_ARGS="--train-size 200 --eval-size 8"
fi
D="$OUT/data"
EVALS=(--eval "retain=$D/retain_eval_equation.jsonl" --eval "forget=$D/forget_eval_equation.jsonl")
QUIET_ARG=(); [ "$QUIET" = 1 ] && QUIET_ARG=(--quiet)
COMMON=(--batch-size "$BATCH" --max-length "$LENGTH" --overwrite --log-every "$LOG_EVERY"
        "${QUIET_ARG[@]}")
TRAIN=("${COMMON[@]}" --seed "$SEED")
[ "$STAGES" = undo ] && STAGE_COUNT=0 || STAGE_COUNT=4
[ "$STAGES" != prepare ] && STAGE_COUNT=$(( STAGE_COUNT + 2 * SEEDS + 1 ))

DISTILL_FILES=(--data "$D/retain_train.jsonl")
[ "$DISTILL_DATA" = all ] && DISTILL_FILES+=(--data "$D/forget_train.jsonl")

if [ "$STAGES" != undo ]; then
stage "data"
# shellcheck disable=SC2086 # DATA_ARGS holds several options
undo data arithmetic "$D" --seed "$SEED" --overwrite $DATA_ARGS

BASE=(--init "$PRESET" --max-steps "$BASE_STEPS" --lr "$BASE_LR" --warmup-steps 50)
if [ "$THREADS" -ge 2 ]; then
  # Two independent trainings sharing the threads (tiny models gain little from more); the
  # base model's progress shows, the oracle's (as fast) would interleave with it.
  stage "train base (retain + forget) and oracle (retain only), side by side"
  half=$((THREADS / 2))
  undo --threads "$((THREADS - half))" train "$OUT/base" --data "$D/retain_train.jsonl" \
    --data "$D/forget_train.jsonl" "${BASE[@]}" "${TRAIN[@]}" & base_pid=$!
  undo --threads "$half" train "$OUT/oracle" --data "$D/retain_train.jsonl" "${BASE[@]}" \
    "${TRAIN[@]}" --quiet & oracle_pid=$!
  wait "$base_pid"
  wait "$oracle_pid"
  STAGE_NO=$((STAGE_NO + 1))
else
  stage "train base (retain + forget)"
  undo --threads "$THREADS" train "$OUT/base" --data "$D/retain_train.jsonl" \
    --data "$D/forget_train.jsonl" "${BASE[@]}" "${TRAIN[@]}"
  stage "train oracle (retain only, the data-filtering gold standard)"
  undo --threads "$THREADS" train "$OUT/oracle" --data "$D/retain_train.jsonl" "${BASE[@]}" \
    "${TRAIN[@]}"
fi

stage "unlearn (MaxEnt)"
undo --threads "$THREADS" unlearn "$OUT/base" "$OUT/unlearned" --method maxent \
  --forget "$D/forget_train.jsonl" --retain "$D/retain_train.jsonl" \
  --max-steps "$UNLEARN_STEPS" --lr 1e-3 "${TRAIN[@]}"
fi
[ "$STAGES" = prepare ] && exit 0

REPORT=()
for ((k = 0; k < SEEDS; k++)); do
  seed=$((SEED + k))
  tag=""; [ "$k" -gt 0 ] && tag="-s$k"
  of=""; [ "$SEEDS" -gt 1 ] && of=", seed $seed ($((k + 1)) of $SEEDS)"
  RUN=("${COMMON[@]}" --seed "$seed")

  stage "perturb (alpha $ALPHA, beta $BETA) and distill$of"
  undo --threads "$THREADS" perturb "$OUT/unlearned" "$OUT/perturbed$tag" --alpha "$ALPHA" \
    --beta "$BETA" --seed "$seed" --overwrite --quiet
  undo --threads "$THREADS" distill "$OUT/undo$tag" --teacher "$OUT/unlearned" --student "$OUT/perturbed$tag" \
    "${DISTILL_FILES[@]}" "${EVALS[@]}" \
    --stop-when "retain.accuracy >= teacher - 0.05" --eval-every 50 \
    --max-steps "$DISTILL_MAX_STEPS" --lr "$DISTILL_LR" --warmup-steps 20 "${RUN[@]}"

  stage "relearning attacks on base, unlearned, UNDO and oracle$of"
  for model in base unlearned undo oracle; do
    target="$OUT/$model"; [ "$model" = undo ] && target="$OUT/undo$tag"
    echo "   attack on $model" >&2
    undo --threads "$THREADS" relearn-attack "$target" --data "$D/forget_train.jsonl" "${EVALS[@]}" \
      --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --steps "$ATTACK_STEPS" \
      --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" --max-length "$LENGTH" \
      --seed "$seed" --out "$OUT/attacks/$model$tag" --overwrite "${QUIET_ARG[@]}"
    REPORT+=("$model=$OUT/attacks/$model$tag")
  done
done

finish_report "${REPORT[@]}"
