#!/usr/bin/env bash
# The RMU setting of the WMDP paper on Zephyr-7B-beta (Mistral architecture), on one 80 GB GPU,
# then UNDO and the relearning attack on both.
#
#   RMU (WMDP's values, undo's rmu defaults: steer the output of layer 7 towards 6.5 * u on
#   forget text, retain weight 1200, train the MLP down-projections of layers 5-7, lr 5e-5,
#   batch 4 x 512 tokens, 150 steps) -> UNDO (noise alpha 0.25 / beta 0 in memory,
#   distil on retain text) -> WMDP-bio / MMLU through lm-evaluation-harness -> the paper's
#   three WMDP learning rates of relearning on both -> `undo report` (no oracle exists for
#   Zephyr: the report gives forget accuracy before and after the attacks).
#
# Real run (undo downloads nothing; put the model and files on disk first):
#
#   MODEL=/models/zephyr-7b-beta FORGET_CORPUS=wmdp/bio-forget-corpus.jsonl \
#   RETAIN_CORPUS=wikitext.jsonl FORGET_EVAL=wmdp_bio.jsonl RETAIN_EVAL=mmlu.jsonl \
#   bash examples/zephyr_wmdp.sh
#
# Hardware (ESTIMATES from undo's memory plan, python examples/recipe_estimates.py and
# `undo plan`, which PLAN=1 runs before each step; nothing here ran on a GPU):
#   unlearn --method rmu, --bf16-weights:       ~57 GB (weights 14.5 GB + the frozen
#                                                reference 14.5 GB + activations 27 GB)
#                                                (fp32 master weights: ~87 GB, does not fit)
#   distill, full student, adafactor,
#     --bf16-weights --gradient-checkpointing:   ~46 GB (adamw8bit: ~61 GB)
#   relearn-attack, full, adafactor, same flags: ~49 GB (LoRA r=128: ~37 GB)
# Time at an assumed 300 TFLOP/s sustained: RMU 150 steps x 2 streams x 4 x 512 tokens
# (0.6M tokens) ~2 min; distill 1000 steps x 4 x 1024 (4M tokens) ~13 min; attacks
# 2 models x 3 lrs x 150 steps x 8 x 1024 (7.4M tokens) ~25 min, plus evaluation.
#
# SMOKE=1: seconds-long offline version on a tiny random Mistral stand-in (2 layers, 32 wide)
# and `undo data facts` files (tests/e2e/test_recipes.py). Its numbers mean nothing.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage

OUT="${OUT:-runs/zephyr_wmdp}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
FORGET_CORPUS="${FORGET_CORPUS:-}"
RETAIN_CORPUS="${RETAIN_CORPUS:-}"
FORGET_EVAL="${FORGET_EVAL:-}"
RETAIN_EVAL="${RETAIN_EVAL:-}"
LM_EVAL_TASKS="${LM_EVAL_TASKS:-wmdp_bio,mmlu}"
RMU_LAYER="${RMU_LAYER:-7}"
RMU_STEPS="${RMU_STEPS:-150}"
RMU_LR="${RMU_LR:-5e-5}"
RMU_LENGTH="${RMU_LENGTH:-512}"
ALPHA="${ALPHA:-0.25}"
BETA="${BETA:-0}"
DISTILL_STEPS="${DISTILL_STEPS:-1000}"
DISTILL_LR="${DISTILL_LR:-2e-5}"
ATTACK_LRS="${ATTACK_LRS:-4.62e-6,1e-5,2.15e-5}"
ATTACK_STEPS="${ATTACK_STEPS:-150}"
EVAL_EVERY="${EVAL_EVERY:-25}"
BATCH="${BATCH:-4}"
ATTACK_BATCH="${ATTACK_BATCH:-8}"
LENGTH="${LENGTH:-1024}"
OPTIMIZER="${OPTIMIZER:-adafactor}"    # or adamw8bit (CUDA, pip install 'undo-cli[bnb]')
MEMORY="${MEMORY:---bf16 --bf16-weights --gradient-checkpointing}"
PLAN="${PLAN:-1}"
CHOICE_FORMAT="${CHOICE_FORMAT:-letters}"

if [ "${SMOKE:-0}" = 1 ]; then
  D="$OUT/data"
  undo data facts "$D" --entities 4 --train-size 48 --seed "$SEED" --overwrite
  undo init "$OUT/zephyr" --arch mistral --layers 2 --hidden 32 --heads 4 --intermediate 64 \
    --max-position 128 --seed "$SEED" --overwrite
  MODEL="$OUT/zephyr"
  FORGET_CORPUS="$D/forget_corpus.jsonl" RETAIN_CORPUS="$D/retain_corpus.jsonl"
  FORGET_EVAL="$D/forget_mc.jsonl" RETAIN_EVAL="$D/retain_mc.jsonl" CHOICE_FORMAT=qa
  RMU_LAYER=1 RMU_STEPS=2 RMU_LR=1e-2 RMU_LENGTH=64 DISTILL_STEPS=2 DISTILL_LR=1e-3
  ATTACK_LRS=1e-3 ATTACK_STEPS=2 EVAL_EVERY=2 BATCH=2 ATTACK_BATCH=2 LENGTH=64
  LM_EVAL_TASKS="" MEMORY="--gradient-checkpointing"
fi
for v in MODEL FORGET_CORPUS RETAIN_CORPUS FORGET_EVAL RETAIN_EVAL; do
  [ -n "${!v}" ] || { echo "zephyr_wmdp.sh: $v is not set (or run with SMOKE=1)" >&2; exit 2; }
done
read -ra MEM <<< "$MEMORY"
EVALS=(--eval "forget=$FORGET_EVAL" --eval "retain=$RETAIN_EVAL" --choice-format "$CHOICE_FORMAT")
mkdir -p "$OUT"

# RMU trains 3 matrices: AdamW (the WMDP code's optimizer) keeps little state; --bf16-weights
# halves the model and the frozen reference copy RMU compares the retain activations with.
UNLEARN=(unlearn "$MODEL" "$OUT/unlearned" --method rmu --layer "$RMU_LAYER"
         --forget "$FORGET_CORPUS" --retain "$RETAIN_CORPUS" --max-steps "$RMU_STEPS"
         --lr "$RMU_LR" --batch-size "$BATCH" --max-length "$RMU_LENGTH" --seed "$SEED"
         --overwrite --quiet "${MEM[@]}")
DISTILL=(distill "$OUT/undo" --teacher "$OUT/unlearned" --student teacher --alpha "$ALPHA"
         --beta "$BETA" --perturb-seed "$SEED" --data "$RETAIN_CORPUS" --max-steps "$DISTILL_STEPS"
         --lr "$DISTILL_LR" --batch-size "$BATCH" --max-length "$LENGTH" --seed "$SEED"
         --optimizer "$OPTIMIZER" --overwrite --quiet "${MEM[@]}")
echo "== RMU (the WMDP paper's setting)" >&2
[ "$PLAN" = 1 ] && undo plan "${UNLEARN[@]}"
undo "${UNLEARN[@]}"
echo "== UNDO" >&2
if [ "$PLAN" = 1 ] || [ "${SMOKE:-0}" = 1 ]; then undo plan "${DISTILL[@]}"; fi
undo "${DISTILL[@]}"

echo "== WMDP-bio / MMLU before the attacks" >&2
LM_EVAL=()
[ -n "$LM_EVAL_TASKS" ] && LM_EVAL=(--lm-eval-tasks "$LM_EVAL_TASKS")
undo eval "$MODEL" "$OUT/unlearned" "$OUT/undo" --data "forget=$FORGET_EVAL" \
  --data "retain=$RETAIN_EVAL" --choice-format "$CHOICE_FORMAT" "${LM_EVAL[@]}" \
  --json > "$OUT/eval.json"

echo "== relearning attacks (lrs $ATTACK_LRS)" >&2
LABELS=()
for model in unlearned undo; do
  undo relearn-attack "$OUT/$model" --data "$FORGET_CORPUS" "${EVALS[@]}" \
    --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --optimizers "$OPTIMIZER" \
    --steps "$ATTACK_STEPS" --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" \
    --max-length "$LENGTH" --seed "$SEED" --no-plot --out "$OUT/attacks/$model" --overwrite \
    --quiet "${MEM[@]}"
  LABELS+=("$model=$OUT/attacks/$model")
done
undo report "${LABELS[@]}" --out "$OUT/attacks/report" --overwrite
echo "report: $OUT/attacks/report/report.md; before the attacks: $OUT/eval.json" >&2
