#!/usr/bin/env bash
# UNDO at real scale against a public data-filtering oracle: EleutherAI's Deep Ignorance suite
# (6.9B GPT-NeoX models trained on the same 550B tokens with and without bio filtering).
#
#   the unfiltered model = the base; the filtered model = the oracle (the gold standard of
#   robustness) -> unlearn the base (MaxEnt, or METHOD=rmu) on a bio forget corpus -> UNDO
#   (the unlearned model noised in memory, alpha 0.25 / beta 0, distilled on retain text) ->
#   WMDP-bio (and its robust subset) through lm-evaluation-harness for every model ->
#   the same relearning attack on base, oracle, unlearned and UNDO -> `undo report`: the
#   oracle-relative robustness at real scale.
#
# Real run (nothing is downloaded by undo: put the checkpoints and files on disk first):
#
#   BASE=/models/deep-ignorance-unfiltered ORACLE=/models/deep-ignorance-filtered \
#   FORGET_CORPUS=bio_forget_corpus.jsonl RETAIN_CORPUS=wikitext.jsonl \
#   FORGET_EVAL=wmdp_bio.jsonl RETAIN_EVAL=mmlu.jsonl TASKS_DIR=deep-ignorance/tasks \
#   bash examples/deep_ignorance.sh
#
# (corpora: {"text"} records; FORGET_EVAL / RETAIN_EVAL: {"question","choices","answer"}
# records, what the attacks measure; TASKS_DIR: the suite's lm-eval task YAMLs, for
# LM_EVAL_TASKS, default wmdp_bio and wmdp_bio_robust.)
#
# Hardware (ESTIMATES from undo's memory plan, `python examples/recipe_estimates.py`; not run
# on a GPU by undo's developers): one 80 GB GPU. Per process, batch 4 x 1024 tokens:
#   unlearn (maxent, full):  adafactor + --bf16-weights + --gradient-checkpointing ~31 GB
#                            (+14 GB for MaxEnt's frozen reference: none; RMU keeps one)
#   distill (full student):  the same ~31 GB + the teacher's 14 GB in bf16 = ~45 GB
#   relearn-attack (full):   ~31 GB + the original kept for the next run, 14 GB = ~45 GB
#   full AdamW with fp32 master weights needs ~130 GB: use FSDP (8 GPUs: ~17 GB each,
#   examples/accelerate/fsdp.yaml) or fsdp_offload.yaml with --optimizer adamw.
# Time at an assumed 300 TFLOP/s sustained: ~180 s per million trained tokens (6.9B,
# checkpointing); the defaults below (unlearn 100 x 4 x 8 x 1024 = 3.3M tokens, distill
# 1000 steps = 33M tokens, 4 models x 3 attack lrs x 150 steps x 8 x 1024 = 15M tokens) are
# ~2.5 GPU-hours. Run `undo plan CMD ARGS` (PLAN=1 below does) for your checkpoint's figures.
#
# SMOKE=1: seconds-long offline version on tiny random GPT-NeoX stand-ins (2 layers, 32 wide)
# and `undo data facts` files; what tests/e2e/test_recipes.py runs. Its numbers mean nothing.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage

OUT="${OUT:-runs/deep_ignorance}"
SEED="${SEED:-0}"
BASE="${BASE:-}"                       # the unfiltered model (directory)
ORACLE="${ORACLE:-}"                   # the filtered model (directory)
FORGET_CORPUS="${FORGET_CORPUS:-}"
RETAIN_CORPUS="${RETAIN_CORPUS:-}"
FORGET_EVAL="${FORGET_EVAL:-}"
RETAIN_EVAL="${RETAIN_EVAL:-}"
TASKS_DIR="${TASKS_DIR:-}"             # lm-eval task YAMLs (the suite's WMDP-bio robust subset)
LM_EVAL_TASKS="${LM_EVAL_TASKS:-wmdp_bio,wmdp_bio_robust}"
METHOD="${METHOD:-maxent}"             # maxent or rmu
UNLEARN_STEPS="${UNLEARN_STEPS:-100}"
UNLEARN_LR="${UNLEARN_LR:-5e-5}"
ALPHA="${ALPHA:-0.25}"
BETA="${BETA:-0}"
DISTILL_STEPS="${DISTILL_STEPS:-1000}"
DISTILL_LR="${DISTILL_LR:-2e-5}"
ATTACK_LRS="${ATTACK_LRS:-4.62e-6,1e-5,2.15e-5}"
ATTACK_STEPS="${ATTACK_STEPS:-150}"
EVAL_EVERY="${EVAL_EVERY:-25}"
BATCH="${BATCH:-4}"
ACCUM="${ACCUM:-8}"
LENGTH="${LENGTH:-1024}"
MEMORY="${MEMORY:---bf16 --bf16-weights --gradient-checkpointing}"
OPTIMIZER="${OPTIMIZER:-adafactor}"    # or adamw8bit (CUDA, pip install 'undo-cli[bnb]')
PLAN="${PLAN:-1}"                      # print `undo plan` before each training command
CHOICE_FORMAT="${CHOICE_FORMAT:-letters}"

if [ "${SMOKE:-0}" = 1 ]; then
  D="$OUT/data"
  undo data facts "$D" --entities 4 --train-size 48 --seed "$SEED" --overwrite
  for m in unfiltered:0 filtered:1; do  # random stand-ins (no filtering happened)
    undo init "$OUT/${m%%:*}" --arch gpt_neox --layers 2 --hidden 32 --heads 4 \
      --intermediate 64 --max-position 128 --seed "${m##*:}" --overwrite
  done
  BASE="$OUT/unfiltered" ORACLE="$OUT/filtered"
  FORGET_CORPUS="$D/forget_corpus.jsonl" RETAIN_CORPUS="$D/retain_corpus.jsonl"
  FORGET_EVAL="$D/forget_mc.jsonl" RETAIN_EVAL="$D/retain_mc.jsonl" CHOICE_FORMAT=qa
  UNLEARN_STEPS=2 UNLEARN_LR=1e-3 DISTILL_STEPS=2 DISTILL_LR=1e-3 ATTACK_LRS=1e-3
  ATTACK_STEPS=2 EVAL_EVERY=2 BATCH=2 ACCUM=1 LENGTH=64 PLAN=0 LM_EVAL_TASKS=""
  MEMORY="--gradient-checkpointing"
fi
for v in BASE ORACLE FORGET_CORPUS RETAIN_CORPUS FORGET_EVAL RETAIN_EVAL; do
  [ -n "${!v}" ] || { echo "deep_ignorance.sh: $v is not set (or run with SMOKE=1)" >&2; exit 2; }
done
read -ra MEM <<< "$MEMORY"
COMMON=(--max-length "$LENGTH" --batch-size "$BATCH" --seed "$SEED" --overwrite --quiet "${MEM[@]}")
EVALS=(--eval "forget=$FORGET_EVAL" --eval "retain=$RETAIN_EVAL" --choice-format "$CHOICE_FORMAT")
mkdir -p "$OUT"

UNLEARN=(unlearn "$BASE" "$OUT/unlearned" --method "$METHOD" --forget "$FORGET_CORPUS"
         --retain "$RETAIN_CORPUS" --max-steps "$UNLEARN_STEPS" --lr "$UNLEARN_LR"
         --grad-accum "$ACCUM" --optimizer "$OPTIMIZER" "${COMMON[@]}")
DISTILL=(distill "$OUT/undo" --teacher "$OUT/unlearned" --student teacher --alpha "$ALPHA"
         --beta "$BETA" --perturb-seed "$SEED" --data "$RETAIN_CORPUS" --max-steps "$DISTILL_STEPS"
         --lr "$DISTILL_LR" --grad-accum "$ACCUM" --optimizer "$OPTIMIZER" "${COMMON[@]}")
echo "== unlearn the unfiltered model ($METHOD)" >&2
[ "$PLAN" = 1 ] && undo plan "${UNLEARN[@]}"
undo "${UNLEARN[@]}"
echo "== UNDO: noise the unlearned model, distil it back on retain text" >&2
[ "$PLAN" = 1 ] && undo plan "${DISTILL[@]}"
undo "${DISTILL[@]}"

echo "== forget / retain accuracy of every model" >&2
MODELS=("$BASE" "$ORACLE" "$OUT/unlearned" "$OUT/undo")
LM_EVAL=()
if [ -n "$LM_EVAL_TASKS" ]; then
  LM_EVAL=(--lm-eval-tasks "$LM_EVAL_TASKS")
  [ -n "$TASKS_DIR" ] && LM_EVAL+=(--lm-eval-include-path "$TASKS_DIR")
fi
undo eval "${MODELS[@]}" --data "forget=$FORGET_EVAL" --data "retain=$RETAIN_EVAL" \
  --choice-format "$CHOICE_FORMAT" "${LM_EVAL[@]}" --json > "$OUT/eval.json"

echo "== the same relearning attack on every model (lrs $ATTACK_LRS)" >&2
LABELS=()
for model in base oracle unlearned undo; do
  case "$model" in base) ckpt="$BASE" ;; oracle) ckpt="$ORACLE" ;; *) ckpt="$OUT/$model" ;; esac
  if [ "${SMOKE:-0}" = 1 ] && [ "$model" = base ]; then continue; fi  # keep the smoke short
  undo relearn-attack "$ckpt" --data "$FORGET_CORPUS" "${EVALS[@]}" \
    --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --optimizers "$OPTIMIZER" \
    --steps "$ATTACK_STEPS" \
    --eval-every "$EVAL_EVERY" --max-length "$LENGTH" --batch-size "$BATCH" --seed "$SEED" \
    --no-plot --out "$OUT/attacks/$model" --overwrite --quiet "${MEM[@]}"
  LABELS+=("$model=$OUT/attacks/$model")
done
undo report "${LABELS[@]}" --out "$OUT/attacks/report" --overwrite
echo "report: $OUT/attacks/report/report.md; accuracy before the attacks: $OUT/eval.json" >&2
