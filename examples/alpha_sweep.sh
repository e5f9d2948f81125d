#!/usr/bin/env bash
# UNDO's compute/robustness trade-off on the arithmetic task: distil the unlearned model into
# students noised with each alpha, attack each one with the same grid as examples/arithmetic.sh,
# and put them in one report (its pareto.png is the trade-off curve of the paper's Figure 1).
#
# Run examples/arithmetic.sh first with the same OUT: this reuses its data, base, oracle and
# unlearned models and their attacks. The teacher's outputs are cached (--cache-teacher), so
# the unlearned teacher runs once for the whole sweep (the report's compute for the later
# students therefore counts no teacher forward: it is what the sweep really spent).
# SMOKE=1 for a seconds-long version.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage

OUT="${OUT:-runs/arithmetic}"
ALPHAS="${ALPHAS:-0.2 0.4 0.6 0.8}"
BETA="${BETA:-0.1}"
SEED="${SEED:-0}"
DISTILL_MAX_STEPS="${DISTILL_MAX_STEPS:-1000}"
DISTILL_LR="${DISTILL_LR:-3e-3}"
ATTACK_STEPS="${ATTACK_STEPS:-100}"
ATTACK_LRS="${ATTACK_LRS:-1e-4,3e-4,1e-3}"
EVAL_EVERY="${EVAL_EVERY:-20}"
BATCH="${BATCH:-32}"
ATTACK_BATCH="${ATTACK_BATCH:-16}"
LENGTH="${LENGTH:-64}"
if [ "${SMOKE:-0}" = 1 ]; then
  ALPHAS="0.2 0.8" DISTILL_MAX_STEPS=4 ATTACK_STEPS=2 ATTACK_LRS=1e-3 EVAL_EVERY=2 BATCH=4
  ATTACK_BATCH=4 LENGTH=32
fi
D="$OUT/data"
S="$OUT/sweep"
for part in data/retain_train.jsonl unlearned attacks/base attacks/unlearned attacks/oracle; do
  [ -e "$OUT/$part" ] || { echo "missing $OUT/$part: run examples/arithmetic.sh first" >&2; exit 2; }
done
EVALS=(--eval "retain=$D/retain_eval_equation.jsonl" --eval "forget=$D/forget_eval_equation.jsonl")
labels=("base=$OUT/attacks/base" "unlearned=$OUT/attacks/unlearned" "oracle=$OUT/attacks/oracle")

for alpha in $ALPHAS; do
  echo "== alpha $alpha: distill and attack" >&2
  undo distill "$S/undo-$alpha" --teacher "$OUT/unlearned" --student teacher --alpha "$alpha" \
    --beta "$BETA" --perturb-seed "$SEED" --data "$D/retain_train.jsonl" "${EVALS[@]}" \
    --stop-when "retain.accuracy >= teacher - 0.05" --eval-every 50 \
    --max-steps "$DISTILL_MAX_STEPS" --lr "$DISTILL_LR" --warmup-steps 20 \
    --cache-teacher "$S/teacher-cache" --cache-topk 128 \
    --batch-size "$BATCH" --max-length "$LENGTH" --seed "$SEED" --overwrite --quiet
  undo relearn-attack "$S/undo-$alpha" --data "$D/forget_train.jsonl" "${EVALS[@]}" \
    --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --steps "$ATTACK_STEPS" \
    --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" --max-length "$LENGTH" \
    --seed "$SEED" --out "$S/attacks/undo-$alpha" --overwrite --quiet
  labels+=("undo-$alpha=$S/attacks/undo-$alpha")
done

echo "== report" >&2
undo report "${labels[@]}" --out "$S/report" --overwrite
echo "report: $S/report/report.md (pareto.png: compute against robustness)" >&2
