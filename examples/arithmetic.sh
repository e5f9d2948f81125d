#!/usr/bin/env bash
# UNDO on the paper's arithmetic task, end to end, on a laptop CPU (about 7 minutes on 2 cores).
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
# with 95% intervals (about 2.5 more minutes per extra seed). Seed SEED writes `undo` and
# `attacks/MODEL`, the others `undo-sK` and `attacks/MODEL-sK`.
set -euo pipefail

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
if [ "${SMOKE:-0}" = 1 ]; then
  BASE_STEPS=10 UNLEARN_STEPS=3 DISTILL_MAX_STEPS=4 ATTACK_STEPS=2 ATTACK_LRS=1e-3 EVAL_EVERY=2
  BATCH=4 ATTACK_BATCH=4 LENGTH=32 PRESET=tiny DATA_ARGS="--train-size 200 --eval-size 8"
fi
undo() { if [ -n "${UNDO:-}" ]; then $UNDO "$@"; else command undo "$@"; fi; }
D="$OUT/data"
EVALS=(--eval "retain=$D/retain_eval_equation.jsonl" --eval "forget=$D/forget_eval_equation.jsonl")
TRAIN=(--batch-size "$BATCH" --max-length "$LENGTH" --seed "$SEED" --overwrite --quiet)

DISTILL_FILES=(--data "$D/retain_train.jsonl")
[ "$DISTILL_DATA" = all ] && DISTILL_FILES+=(--data "$D/forget_train.jsonl")

if [ "$STAGES" != undo ]; then
echo "== data" >&2
# shellcheck disable=SC2086 # DATA_ARGS holds several options
undo data arithmetic "$D" --seed "$SEED" --overwrite $DATA_ARGS

echo "== train base (retain + forget) and oracle (retain only), side by side" >&2
# Two independent trainings, one per half of the cores (tiny models gain little from more).
half=$(( $(nproc) / 2 )); [ "$half" -ge 1 ] || half=1; [ "$half" -le 2 ] || half=2
OMP_NUM_THREADS=$half undo train "$OUT/base" --init "$PRESET" --data "$D/retain_train.jsonl" \
  --data "$D/forget_train.jsonl" --max-steps "$BASE_STEPS" --lr "$BASE_LR" --warmup-steps 50 \
  "${TRAIN[@]}" & base_pid=$!
OMP_NUM_THREADS=$half undo train "$OUT/oracle" --init "$PRESET" --data "$D/retain_train.jsonl" \
  --max-steps "$BASE_STEPS" --lr "$BASE_LR" --warmup-steps 50 "${TRAIN[@]}" & oracle_pid=$!
wait "$base_pid"
wait "$oracle_pid"

echo "== unlearn (MaxEnt)" >&2
undo unlearn "$OUT/base" "$OUT/unlearned" --method maxent --forget "$D/forget_train.jsonl" \
  --retain "$D/retain_train.jsonl" --max-steps "$UNLEARN_STEPS" --lr 1e-3 "${TRAIN[@]}"
fi
[ "$STAGES" = prepare ] && exit 0

REPORT=()
for ((k = 0; k < SEEDS; k++)); do
  seed=$((SEED + k))
  tag=""; [ "$k" -gt 0 ] && tag="-s$k"
  [ "$SEEDS" -gt 1 ] && echo "== seed $seed ($((k + 1)) of $SEEDS)" >&2
  RUN=(--batch-size "$BATCH" --max-length "$LENGTH" --seed "$seed" --overwrite --quiet)

  echo "== perturb (alpha $ALPHA, beta $BETA) and distill" >&2
  undo perturb "$OUT/unlearned" "$OUT/perturbed$tag" --alpha "$ALPHA" --beta "$BETA" \
    --seed "$seed" --overwrite --quiet
  undo distill "$OUT/undo$tag" --teacher "$OUT/unlearned" --student "$OUT/perturbed$tag" \
    "${DISTILL_FILES[@]}" "${EVALS[@]}" \
    --stop-when "retain.accuracy >= teacher - 0.05" --eval-every 50 \
    --max-steps "$DISTILL_MAX_STEPS" --lr "$DISTILL_LR" --warmup-steps 20 "${RUN[@]}"

  echo "== relearning attacks" >&2
  for model in base unlearned undo oracle; do
    target="$OUT/$model"; [ "$model" = undo ] && target="$OUT/undo$tag"
    undo relearn-attack "$target" --data "$D/forget_train.jsonl" "${EVALS[@]}" \
      --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --steps "$ATTACK_STEPS" \
      --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" --max-length "$LENGTH" \
      --seed "$seed" --out "$OUT/attacks/$model$tag" --overwrite --quiet
    REPORT+=("$model=$OUT/attacks/$model$tag")
  done
done

echo "== report" >&2
undo report "${REPORT[@]}" --out "$OUT/report" --overwrite
echo "report: $OUT/report/report.md" >&2
