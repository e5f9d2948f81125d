#!/usr/bin/env bash
# The paper's WMDP recipe, end to end, on a WMDP-shaped synthetic task that runs on a CPU
# (about 10 minutes on 2 busy cores), or on a real model and real data on a GPU (see README).
#
#   data (`undo data facts`: a made-up "hazard" domain to forget, a "general" domain to keep,
#   four-choice questions in the WMDP/MMLU layout and a text corpus of each) -> train a
#   Gemma-2-shaped base (both domains) and an oracle (general only: data filtering) ->
#   unlearn (MaxEnt, or METHOD=rmu) -> UNDO the WMDP way: the teacher noised in memory with
#   alpha 0.25, beta 0 (pure shrink) on the trained layers only, layer-selective distillation
#   on general text -> multiple-choice accuracy of both domains for every model (`undo eval`)
#   -> relearning attack on the hazard corpus with the paper's three WMDP learning rates ->
#   report.
#
# Every knob below can be set from the environment; with MODEL set (a real model, on a GPU) the
# defaults in the second column apply: the paper's WMDP values where it gives them. E.g.
#
#   MODEL=/models/gemma-2-2b FORGET_CORPUS=wmdp/bio-forget-corpus.jsonl \
#   RETAIN_CORPUS=wikitext.jsonl FORGET_EVAL=wmdp/wmdp-bio.jsonl RETAIN_EVAL=mmlu.jsonl \
#   bash examples/wmdp_shaped.sh
#
# (FORGET_EVAL / RETAIN_EVAL: {"question", "choices", "answer"} records, the layout of WMDP's
# and MMLU's files; the corpora: {"text"} records.) SMOKE=1 runs a seconds-long version with
# tiny budgets (what the test suite runs).
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage

MODEL="${MODEL:-}"                          # a real base model; empty: train a toy one
d() { if [ -n "$MODEL" ]; then echo "$2"; else echo "$1"; fi; }  # d TOY REAL
OUT="${OUT:-runs/wmdp_shaped}"
SEED="${SEED:-0}"
ORACLE="${ORACLE:-}"                        # a real data-filtered model (optional)
FORGET_CORPUS="${FORGET_CORPUS:-}"          # empty (all four): the synthetic task's files
RETAIN_CORPUS="${RETAIN_CORPUS:-}"
FORGET_EVAL="${FORGET_EVAL:-}"
RETAIN_EVAL="${RETAIN_EVAL:-}"
DISTILL_DATA="${DISTILL_DATA:-}"            # space-separated PATH[:WEIGHT]; default RETAIN_CORPUS
ATTACK_DATA="${ATTACK_DATA:-}"              # default FORGET_CORPUS
# letters: lm-eval's WMDP/MMLU prompt; qa on the toy task (a 0.5M model does not learn to
# answer by letter in minutes: 25%, chance, after 1,500 steps; by value it is 100%)
CHOICE_FORMAT="${CHOICE_FORMAT:-$(d qa letters)}"
ARCH="${ARCH:-gemma2}"                      # the toy base: Gemma-2-shaped, 4 layers, 96 wide
TOY_SHAPE="${TOY_SHAPE:---layers 4 --hidden 96 --heads 4 --intermediate 256}"
DATA_ARGS="${DATA_ARGS:---entities 16 --train-size 2000 --qa-fraction 0.4 --mc-fraction 0}"
BASE_STEPS="${BASE_STEPS:-400}"
BASE_LR="${BASE_LR:-3e-3}"
METHOD="${METHOD:-maxent}"                  # maxent or rmu (or any `undo unlearn` method)
UNLEARN_STEPS="${UNLEARN_STEPS:-$(d 60 100)}"
UNLEARN_LR="${UNLEARN_LR:-}"                # default: the method's (5e-5 from 10M parameters)
UNLEARN_ARGS="${UNLEARN_ARGS:-}"
ALPHA="${ALPHA:-0.25}"                      # the paper's WMDP setting: alpha 0.25, beta 0
BETA="${BETA:-0}"
TRAIN_LAYERS="${TRAIN_LAYERS:-$(d 0-3 all)}"  # decoder layers that train (and are shrunk);
                                            # all: every parameter (the paper's runs)
TRAIN_REGEX="${TRAIN_REGEX:-}"              # e.g. mlp: only those parameters of TRAIN_LAYERS
HIDDEN_LOSS_WEIGHT="${HIDDEN_LOSS_WEIGHT:-0}"   # the paper's activation loss (its "both
HIDDEN_LAYERS="${HIDDEN_LAYERS:-}"               # losses" setting: 10)
SECOND_TEACHER_FRACTION="${SECOND_TEACHER_FRACTION:-0}"  # micro-batches distilled from the base
DISTILL_MAX_STEPS="${DISTILL_MAX_STEPS:-$(d 300 1000)}"
DISTILL_LR="${DISTILL_LR:-$(d 2e-3 2e-5)}"  # the paper's WMDP distillation: 2e-5
DISTILL_EVAL_EVERY="${DISTILL_EVAL_EVERY:-$(d 50 200)}"
STOP_WHEN="${STOP_WHEN:-}"                  # e.g. "retain.accuracy >= teacher - 0.03" (the
                                            # paper's 3-point MMLU rule); empty: the whole
                                            # budget, as the paper's WMDP runs
ATTACK_LRS="${ATTACK_LRS:-4.62e-6,1e-5,2.15e-5}"  # the paper's three WMDP learning rates
ATTACK_STEPS="${ATTACK_STEPS:-$(d 100 150)}"      # the paper: 500
EVAL_EVERY="${EVAL_EVERY:-25}"
ATTACK_MODELS="${ATTACK_MODELS:-base unlearned undo oracle}"  # oracle: when there is one
ATTACKS="${ATTACKS:-$OUT/attacks}"          # where the attack results and report go
ATTACK_ARGS="${ATTACK_ARGS:-$(d '' '--eval-limit 1000')}"  # a sample of a large MMLU file
BATCH="${BATCH:-$(d 32 8)}"
LENGTH="${LENGTH:-$(d 96 1024)}"
ATTACK_BATCH="${ATTACK_BATCH:-8}"
EXTRA="${EXTRA:-$(d '' --bf16)}"            # options of every training command
STAGES="${STAGES:-all}"                     # all, prepare (up to unlearn), undo (from distill
                                            # on), attack (attacks and report only)
if [ "${SMOKE:-0}" = 1 ]; then
  BASE_STEPS=6 UNLEARN_STEPS=2 DISTILL_MAX_STEPS=3 ATTACK_STEPS=2 EVAL_EVERY=2 BATCH=4
  ATTACK_BATCH=4 LENGTH=64 TOY_SHAPE="--layers 2 --hidden 32 --heads 2 --intermediate 64"
  TRAIN_LAYERS="${SMOKE_TRAIN_LAYERS:-1}" DATA_ARGS="--entities 4 --train-size 64"
  HIDDEN_LOSS_WEIGHT="${SMOKE_HIDDEN:-1}" SECOND_TEACHER_FRACTION="${SMOKE_SECOND:-0.5}"
  ATTACK_MODELS="${SMOKE_ATTACK_MODELS:-unlearned undo}"
fi

D="$OUT/data"
synthetic=0
if [ -z "$FORGET_CORPUS$RETAIN_CORPUS$FORGET_EVAL$RETAIN_EVAL" ]; then
  synthetic=1
  FORGET_CORPUS="$D/forget_corpus.jsonl" RETAIN_CORPUS="$D/retain_corpus.jsonl"
  FORGET_EVAL="$D/forget_mc.jsonl" RETAIN_EVAL="$D/retain_mc.jsonl"
fi
for v in FORGET_CORPUS RETAIN_CORPUS FORGET_EVAL RETAIN_EVAL; do
  [ -n "${!v}" ] || { echo "wmdp_shaped.sh: give all four of FORGET_CORPUS RETAIN_CORPUS" \
    "FORGET_EVAL RETAIN_EVAL, or none (the synthetic task); $v is empty" >&2; exit 2; }
done
read -ra DISTILL_FILES <<< "${DISTILL_DATA:-$RETAIN_CORPUS}"
read -ra ATTACK_FILES <<< "${ATTACK_DATA:-$FORGET_CORPUS}"
read -ra EXTRA_ARGS <<< "$EXTRA"
EVALS=(--eval "retain=$RETAIN_EVAL" --eval "forget=$FORGET_EVAL" --choice-format "$CHOICE_FORMAT")
COMMON=(--max-length "$LENGTH" --seed "$SEED" --overwrite --quiet "${EXTRA_ARGS[@]}")
BASE="${MODEL:-$OUT/base}"
mkdir -p "$OUT"

if [ "$STAGES" = all ] || [ "$STAGES" = prepare ]; then
if [ "$synthetic" = 1 ]; then
  echo "== data: undo data facts" >&2
  # shellcheck disable=SC2086 # DATA_ARGS holds several options
  undo data facts "$D" --seed "$SEED" --overwrite $DATA_ARGS
fi
if [ -z "$MODEL" ]; then
  echo "== train a toy base (both domains) and an oracle (general only), side by side" >&2
  # shellcheck disable=SC2086 # TOY_SHAPE holds several options
  undo init "$OUT/init" --arch "$ARCH" $TOY_SHAPE --max-position 256 --seed "$SEED" --overwrite
  half=$(( $(nproc) / 2 )); [ "$half" -ge 1 ] || half=1; [ "$half" -le 2 ] || half=2
  TRAIN=(--max-steps "$BASE_STEPS" --lr "$BASE_LR" --warmup-steps 30 --batch-size "$BATCH"
         "${COMMON[@]}")
  OMP_NUM_THREADS=$half undo train "$OUT/base" --init "$OUT/init" --data "$FORGET_CORPUS" \
    --data "$RETAIN_CORPUS" "${TRAIN[@]}" & base_pid=$!
  oracle_pid=""
  if [ -z "$ORACLE" ]; then
    OMP_NUM_THREADS=$half undo train "$OUT/oracle" --init "$OUT/init" --data "$RETAIN_CORPUS" \
      "${TRAIN[@]}" & oracle_pid=$!
  fi
  wait "$base_pid"
  [ -z "$oracle_pid" ] || wait "$oracle_pid"
fi

echo "== unlearn ($METHOD) the hazard domain" >&2
read -ra UNLEARN_EXTRA <<< "$UNLEARN_ARGS"
[ -z "$UNLEARN_LR" ] || UNLEARN_EXTRA+=(--lr "$UNLEARN_LR")
undo unlearn "$BASE" "$OUT/unlearned" --method "$METHOD" --forget "$FORGET_CORPUS" \
  --retain "$RETAIN_CORPUS" --max-steps "$UNLEARN_STEPS" --batch-size "$BATCH" \
  "${UNLEARN_EXTRA[@]}" "${COMMON[@]}"
fi

if [ "$STAGES" = all ] || [ "$STAGES" = undo ]; then
echo "== UNDO: shrink (alpha $ALPHA, beta $BETA) and distill layers $TRAIN_LAYERS" >&2
SELECT=()
[ "$TRAIN_LAYERS" = all ] || SELECT+=(--train-layers "$TRAIN_LAYERS")
[ -z "$TRAIN_REGEX" ] || SELECT+=(--train "$TRAIN_REGEX")
if [ "$HIDDEN_LOSS_WEIGHT" != 0 ]; then
  SELECT+=(--hidden-loss-weight "$HIDDEN_LOSS_WEIGHT")
  [ -z "$HIDDEN_LAYERS" ] || SELECT+=(--hidden-layers "$HIDDEN_LAYERS")
fi
[ "$SECOND_TEACHER_FRACTION" = 0 ] || SELECT+=(--second-teacher "$BASE"
                                               --second-teacher-fraction "$SECOND_TEACHER_FRACTION")
DISTILL_SPECS=()
for f in "${DISTILL_FILES[@]}"; do DISTILL_SPECS+=(--data "$f"); done
[ -z "$STOP_WHEN" ] || DISTILL_SPECS+=(--stop-when "$STOP_WHEN")
undo distill "$OUT/undo" --teacher "$OUT/unlearned" --student teacher --alpha "$ALPHA" \
  --beta "$BETA" --perturb-seed "$SEED" "${SELECT[@]}" "${DISTILL_SPECS[@]}" "${EVALS[@]}" \
  --eval-every "$DISTILL_EVAL_EVERY" --max-steps "$DISTILL_MAX_STEPS" --lr "$DISTILL_LR" \
  --warmup-steps 20 --batch-size "$BATCH" "${COMMON[@]}"

echo "== multiple-choice accuracy of both domains (undo eval)" >&2
MODELS=("$BASE" "$OUT/unlearned" "$OUT/undo")
[ -d "${ORACLE:-$OUT/oracle}" ] && MODELS+=("${ORACLE:-$OUT/oracle}")
undo eval "${MODELS[@]}" --data "retain=$RETAIN_EVAL" --data "forget=$FORGET_EVAL" \
  --choice-format "$CHOICE_FORMAT" --json > "$OUT/eval.json"
fi

if [ "$STAGES" = all ] || [ "$STAGES" = undo ] || [ "$STAGES" = attack ]; then
echo "== relearning attacks (lrs $ATTACK_LRS)" >&2
ATTACK_SPECS=()
for f in "${ATTACK_FILES[@]}"; do ATTACK_SPECS+=(--data "$f"); done
read -ra ATTACK_EXTRA <<< "$ATTACK_ARGS"
LABELS=()
for model in $ATTACK_MODELS; do
  case "$model" in
    base) ckpt="$BASE" ;;
    oracle) ckpt="${ORACLE:-$OUT/oracle}"; [ -d "$ckpt" ] || continue ;;
    *) ckpt="$OUT/$model" ;;
  esac
  undo relearn-attack "$ckpt" "${ATTACK_SPECS[@]}" "${EVALS[@]}" \
    --forget-metric forget.accuracy --lrs "$ATTACK_LRS" --steps "$ATTACK_STEPS" \
    --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" --max-length "$LENGTH" \
    --seed "$SEED" --out "$ATTACKS/$model" --overwrite --quiet "${EXTRA_ARGS[@]}" \
    "${ATTACK_EXTRA[@]}"
  LABELS+=("$model=$ATTACKS/$model")
done

echo "== report" >&2
undo report "${LABELS[@]}" --out "$ATTACKS/report" --overwrite
echo "report: $ATTACKS/report/report.md; accuracy before the attacks: $OUT/eval.json" >&2
fi
