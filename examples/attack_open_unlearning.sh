#!/usr/bin/env bash
# Attack and report any open-unlearning checkpoint (locuslab/open-unlearning: TOFU / MUSE /
# WMDP outputs) with undo: the relearning, quantisation and directional-ablation attacks
# their users asked for (open-unlearning #143), against the retain-only model as the oracle.
#
#   relearn-attack on the unlearned checkpoint (full finetuning and LoRA, a learning-rate grid,
#   4-bit quantisation of every attacked model, directional ablation and few-shot prompting)
#   -> the same attacks on the oracle (TOFU's retain model, trained without the forget set)
#   and optionally on the target (the model before unlearning) -> `undo report`.
#
# Real run (undo downloads nothing): an open-unlearning output directory is an ordinary
# transformers checkpoint (a PEFT adapter works too: give BASE_MODEL, its local base).
#
#   CKPT=saves/unlearn/tofu_Llama-3.2-1B_forget10_GradDiff ORACLE=saves/finetune/tofu_retain90 \
#   TARGET=saves/finetune/tofu_full FORGET_DATA=tofu_forget10.jsonl \
#   FORGET_EVAL=tofu_forget10_qa.jsonl RETAIN_EVAL=tofu_retain_qa.jsonl \
#   bash examples/attack_open_unlearning.sh
#
# (FORGET_DATA: the forget set as {"prompt","completion"} or {"text"} records, what the
# attacker finetunes on; FORGET_EVAL / RETAIN_EVAL: {"prompt","answer"} (exact match) or
# {"question","choices","answer"} records.) FORGET_METRIC: forget.accuracy by default; TOFU's
# answers are long: forget.loss (lower = better recall) is the usual choice there.
#
# Hardware (ESTIMATES from undo's memory plan, `undo plan` / examples/recipe_estimates.py; not
# run on a GPU): a TOFU Llama-3.2-1B attacks with full AdamW --bf16 at 8 x 512 tokens in ~35 GB
# (the attacked copy and the original kept for the next run; ~29 GB with
# --gradient-checkpointing): one 40-48 GB GPU; a 7-8B WMDP/MUSE model (Zephyr, Llama-2-7B) on
# one 80 GB GPU with --bf16-weights --gradient-checkpointing --optimizers adafactor (~49 GB at
# 8 x 1024 tokens) or LoRA (~37 GB).
# `undo plan relearn-attack CKPT ...` (PLAN=1) prints the figures for yours.
#
# SMOKE=1: seconds-long offline version on tiny random Llama stand-ins (tests/e2e/
# test_recipes.py). Its numbers mean nothing.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage

OUT="${OUT:-runs/attack_open_unlearning}"
SEED="${SEED:-0}"
CKPT="${CKPT:-}"                       # the unlearned checkpoint (or adapter)
ORACLE="${ORACLE:-}"                   # the retain-only model
TARGET="${TARGET:-}"                   # optional: the model before unlearning
BASE_MODEL="${BASE_MODEL:-}"           # the local base of an adapter CKPT
FORGET_DATA="${FORGET_DATA:-}"
FORGET_EVAL="${FORGET_EVAL:-}"
RETAIN_EVAL="${RETAIN_EVAL:-}"
FORGET_METRIC="${FORGET_METRIC:-forget.accuracy}"
LRS="${LRS:-1e-5,3e-5,1e-4}"
STEPS="${STEPS:-100}"
EVAL_EVERY="${EVAL_EVERY:-20}"
SEEDS="${SEEDS:-2}"
BATCH="${BATCH:-8}"
LENGTH="${LENGTH:-512}"
LORA_RANK="${LORA_RANK:-32}"
QUANTIZE="${QUANTIZE:-4}"
MEMORY="${MEMORY:---bf16}"             # 7-8B on 80 GB: --bf16-weights --gradient-checkpointing
OPTIMIZERS="${OPTIMIZERS:-adamw}"      # ... --optimizers adafactor (or adamw8bit)
PLAN="${PLAN:-1}"

if [ "${SMOKE:-0}" = 1 ]; then
  D="$OUT/data"
  undo data facts "$D" --entities 4 --train-size 48 --seed "$SEED" --overwrite
  for m in unlearned:0 retain:1; do
    undo init "$OUT/${m%%:*}" --arch llama --layers 2 --hidden 32 --heads 4 --intermediate 64 \
      --max-position 128 --seed "${m##*:}" --overwrite
  done
  CKPT="$OUT/unlearned" ORACLE="$OUT/retain" FORGET_DATA="$D/forget_corpus.jsonl"
  FORGET_EVAL="$D/forget_mc.jsonl" RETAIN_EVAL="$D/retain_mc.jsonl"
  LRS=1e-3 STEPS=2 EVAL_EVERY=2 SEEDS=1 BATCH=2 LENGTH=64 LORA_RANK=4 PLAN=0
  MEMORY="--gradient-checkpointing"
fi
for v in CKPT ORACLE FORGET_DATA FORGET_EVAL RETAIN_EVAL; do
  [ -n "${!v}" ] || { echo "attack_open_unlearning.sh: $v is not set (or SMOKE=1)" >&2; exit 2; }
done
read -ra MEM <<< "$MEMORY"
LOAD=()
[ -n "$BASE_MODEL" ] && LOAD=(--base-model "$BASE_MODEL")
mkdir -p "$OUT"

attack() {  # attack LABEL CKPT MODE...: one relearn-attack run into $OUT/attacks/LABEL-MODE
  local label="$1" ckpt="$2" mode="$3"; shift 3
  local args=(relearn-attack "$ckpt" --data "$FORGET_DATA" --eval "forget=$FORGET_EVAL"
              --eval "retain=$RETAIN_EVAL" --forget-metric "$FORGET_METRIC" --lrs "$LRS"
              --optimizers "$OPTIMIZERS" --steps "$STEPS" --eval-every "$EVAL_EVERY"
              --seeds "$SEEDS" --batch-size "$BATCH" --max-length "$LENGTH" --seed "$SEED"
              --quantize "$QUANTIZE" --no-plot --out "$OUT/attacks/$label-$mode" --overwrite
              --quiet "${MEM[@]}" "$@")
  [ "$PLAN" = 1 ] && undo plan "${args[@]}"
  undo "${args[@]}"
}

echo "== attacks on the unlearned checkpoint: full finetuning (+ ablation, few-shot), LoRA" >&2
attack unlearned "$CKPT" full --ablate-direction --few-shot 3 "${LOAD[@]}"
attack unlearned "$CKPT" lora --lora --lora-rank "$LORA_RANK" "${LOAD[@]}"
echo "== the same on the oracle (retain-only)${TARGET:+ and the target}" >&2
attack oracle "$ORACLE" full --ablate-direction --few-shot 3
[ -n "$TARGET" ] && attack base "$TARGET" full --ablate-direction --few-shot 3
LABELS=("unlearned=$OUT/attacks/unlearned-full" "oracle=$OUT/attacks/oracle-full")
[ -n "$TARGET" ] && LABELS+=("base=$OUT/attacks/base-full")
undo report "${LABELS[@]}" --out "$OUT/attacks/report" --overwrite
echo "report: $OUT/attacks/report/report.md (LoRA: $OUT/attacks/unlearned-lora)" >&2
