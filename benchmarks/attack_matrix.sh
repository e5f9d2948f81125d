#!/usr/bin/env bash
# The oracle-controlled attack matrix (issue 28) on the arithmetic demo's models: every attack
# family of `undo relearn-attack` on base, unlearned, UNDO and oracle, then `undo report`'s
# matrix (report.md, matrix.png, attacker_cost.png), with the wall time of each attack and of
# the whole matrix.
#
#   RUN=runs/arithmetic bash benchmarks/attack_matrix.sh          # the demo's output dir
#   BASE=... UNLEARNED=... UNDO=... ORACLE=... DATA=... OUT=... bash benchmarks/attack_matrix.sh
#   SMOKE=1 ...                                                   # a seconds-long check
#   SETTING=language RUN=runs/language UNDO=runs/language/undo-0.6 ...  # examples/language.sh's
#     models: the Korean loss as the forget metric (forget_eval/retain_eval, loss metrics)
#
# Families per model, in one command each: finetuning on the forget data (the demo's grid),
# PRUNE (default wanda:0.5) alone and before finetuning, QUANTIZE (default nf4, bitsandbytes)
# of the original and of each finetuned model plus QLoRA, benign finetuning on the retain
# training data, and a soft prompt of PROMPT_TOKENS embeddings (EMBED_STEPS steps).
# Needs pip install 'undo-cli[quantize,plot]'.
set -euo pipefail
RUN="${RUN:-runs/arithmetic}"
BASE="${BASE:-$RUN/base}"
UNLEARNED="${UNLEARNED:-$RUN/unlearned}"
UNDO="${UNDO:-$RUN/undo}"
ORACLE="${ORACLE:-$RUN/oracle}"
DATA="${DATA:-$RUN/data}"
OUT="${OUT:-$RUN/matrix}"
STEPS="${STEPS:-100}"
LRS="${LRS:-1e-4,3e-4,1e-3}"
EVAL_EVERY="${EVAL_EVERY:-20}"
BATCH="${BATCH:-16}"
LENGTH="${LENGTH:-64}"
PRUNE="${PRUNE:-wanda:0.5}"
QUANTIZE="${QUANTIZE:-nf4}"
EMBED_STEPS="${EMBED_STEPS:-100}"
PROMPT_TOKENS="${PROMPT_TOKENS:-8}"
LORA_RANK="${LORA_RANK:-16}"
MAX_RETAIN_DROP="${MAX_RETAIN_DROP:-0.1}"
SEED="${SEED:-0}"
SETTING="${SETTING:-arithmetic}"
EXTRA=()
if [ "$SETTING" = language ]; then
  RETAIN_EVAL="${RETAIN_EVAL:-$DATA/retain_eval.jsonl}"
  FORGET_EVAL="${FORGET_EVAL:-$DATA/forget_eval.jsonl}"
  FORGET_METRIC=forget.loss; RETAIN_METRIC=retain.loss
  EXTRA=(--eval-limit "${EVAL_LIMIT:-32}")
else
  RETAIN_EVAL="${RETAIN_EVAL:-$DATA/retain_eval_equation.jsonl}"
  FORGET_EVAL="${FORGET_EVAL:-$DATA/forget_eval_equation.jsonl}"
  FORGET_METRIC=forget.accuracy; RETAIN_METRIC=retain.accuracy
fi
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=2; LRS=1e-3; EVAL_EVERY=1; EMBED_STEPS=2; PROMPT_TOKENS=2; LORA_RANK=4; BATCH=4
fi

EVALS=(--eval "retain=$RETAIN_EVAL" --eval "forget=$FORGET_EVAL")
mkdir -p "$OUT"
START=$SECONDS
REPORT=()
for pair in "base=$BASE" "unlearned=$UNLEARNED" "undo=$UNDO" "oracle=$ORACLE"; do
  label="${pair%%=*}"; model="${pair#*=}"
  t0=$SECONDS
  undo relearn-attack "$model" --data "$DATA/forget_train.jsonl" "${EVALS[@]}" \
    --forget-metric "$FORGET_METRIC" --retain-metric "$RETAIN_METRIC" "${EXTRA[@]}" \
    --lrs "$LRS" --steps "$STEPS" --eval-every "$EVAL_EVERY" --batch-size "$BATCH" \
    --max-length "$LENGTH" --seed "$SEED" \
    --prune "$PRUNE" --quantize "$QUANTIZE" --qlora --lora-rank "$LORA_RANK" \
    --benign-data "$DATA/retain_train.jsonl" \
    --embedding-attack "$EMBED_STEPS" --prompt-tokens "$PROMPT_TOKENS" \
    --out "$OUT/attacks/$label" --overwrite --quiet
  echo "attack on $label: $((SECONDS - t0)) s" >&2
  REPORT+=("$label=$OUT/attacks/$label")
done
undo report "${REPORT[@]}" --out "$OUT/report" --max-retain-drop "$MAX_RETAIN_DROP" --overwrite
echo "matrix wall time: $((SECONDS - START)) s" >&2
sed -n '/^## Attack matrix/,/^!\[attack matrix\]/p;/^## Attacker compute/,/^!\[worst case/p' \
  "$OUT/report/report.md"
