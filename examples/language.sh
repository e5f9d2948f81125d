#!/usr/bin/env bash
# UNDO in the paper's language setting, end to end, on a laptop CPU (about 13 minutes on 2
# cores; SEEDS=3 about 20): retain English, forget Korean, the forget metric the cross-entropy
# of held-out Korean text (lower = more Korean).
#
#   data (built-in public-domain corpus, or RETAIN_CORPUS / FORGET_CORPUS) -> a byte-level BPE
#   trained on both languages -> base (English + Korean) and oracle (English only, the
#   data-filtering gold standard), side by side -> unlearn (MaxEnt on Korean) -> for each alpha
#   in ALPHAS: noise (alpha, beta 0.1) + distill on English until the retain loss is back within
#   RETAIN_TOL (relative) of the teacher's -> relearning attacks on Korean for base, unlearned,
#   every UNDO student and the oracle -> one report: relative robustness (final point and AUC,
#   with intervals) against relative compute for every alpha, the paper's table and frontier.
#
# Every knob below can be set from the environment, e.g. `OUT=runs/l2 ALPHAS="0.6" bash
# examples/language.sh`. SMOKE=1 runs a version of a minute or two (what the test suite runs).
#
# The paper's corpora are FineWeb-Edu sample-10BT (English) and FineWeb-2 kor_Hang (Korean).
# Where you have a network, export a sample of each with `datasets` and point the script at it:
#   python -c "import datasets; datasets.load_dataset('HuggingFaceFW/fineweb-edu',
#     name='sample-10BT', split='train', streaming=True).take(20000).to_json('en.jsonl')"
#   (and HuggingFaceFW/fineweb-2, name='kor_Hang', into ko.jsonl), then
#   RETAIN_CORPUS=en.jsonl FORGET_CORPUS=ko.jsonl MAX_CHARS=20000000 bash examples/language.sh
# (a larger corpus wants a larger PRESET, more BASE_STEPS and a GPU).
#
# SEEDS=3 repeats the UNDO students of SEED_ALPHAS (default 0.6) and the attacks on base,
# unlearned and oracle with seeds SEED+1, SEED+2, ... from the same base, unlearned and oracle
# models; the report pools each label's seeds with 95% intervals. THREADS, LOG_EVERY and QUIET
# as in examples/arithmetic.sh.
set -euo pipefail
# shellcheck source=examples/lib.sh
source "$(dirname "$0")/lib.sh"  # usable_cores, undo (UNDO=...), stage, finish_report

OUT="${OUT:-runs/language}"
SEED="${SEED:-0}"
SEEDS="${SEEDS:-1}"
SEED_ALPHAS="${SEED_ALPHAS:-0.6}"          # the alphas repeated with the extra seeds
ALPHAS="${ALPHAS:-0.2 0.4 0.6 0.8}"
BETA="${BETA:-0.1}"
RETAIN_CORPUS="${RETAIN_CORPUS:-}"          # default: the built-in English corpus
FORGET_CORPUS="${FORGET_CORPUS:-}"          # default: the built-in Korean corpus
MAX_CHARS="${MAX_CHARS:-}"                  # per language (undo data language --max-chars)
VOCAB="${VOCAB:-1024}"                      # BPE tokens, trained on both languages
ARCH="${ARCH:-gemma2}"                      # the paper's model family
PRESET="${PRESET:-tiny}"
LAYERS="${LAYERS:-}"                        # override the preset's size (undo init)
HIDDEN="${HIDDEN:-}"
FORGET_WEIGHT="${FORGET_WEIGHT:-0.2}"       # Korean's share of the base model's batches
BASE_STEPS="${BASE_STEPS:-800}"            # pretraining budget of base and oracle
BASE_LR="${BASE_LR:-3e-3}"
UNLEARN_STEPS="${UNLEARN_STEPS:-60}"
UNLEARN_BATCH="${UNLEARN_BATCH:-8}"       # per stream (forget and retain)
UNLEARN_LR="${UNLEARN_LR:-1e-3}"
DISTILL_MAX_STEPS="${DISTILL_MAX_STEPS:-800}"
DISTILL_LR="${DISTILL_LR:-3e-3}"
RETAIN_TOL="${RETAIN_TOL:-0.05}"            # stop when retain loss <= teacher's x (1 + TOL)
ATTACK_STEPS="${ATTACK_STEPS:-100}"
ATTACK_LRS="${ATTACK_LRS:-3e-4,1e-3,3e-3}"
EVAL_EVERY="${EVAL_EVERY:-20}"
DISTILL_EVAL_EVERY="${DISTILL_EVAL_EVERY:-25}"
BATCH="${BATCH:-16}"
ATTACK_BATCH="${ATTACK_BATCH:-8}"
ATTACK_EVAL_LIMIT="${ATTACK_EVAL_LIMIT:-32}"  # documents per eval set during attacks
LENGTH="${LENGTH:-128}"
DATA_ARGS="${DATA_ARGS:-}"                  # extra options of `undo data language`
THREADS="${THREADS:-${OMP_NUM_THREADS:-$(usable_cores)}}"
LOG_EVERY="${LOG_EVERY:-100}"
QUIET="${QUIET:-0}"
if [ "${SMOKE:-0}" = 1 ]; then
  ALPHAS="${SMOKE_ALPHAS:-0.2 0.8}" BASE_STEPS=6 UNLEARN_STEPS=2 DISTILL_MAX_STEPS=4
  DISTILL_EVAL_EVERY=2 ATTACK_STEPS=2 UNLEARN_BATCH=4 ATTACK_LRS=1e-3 EVAL_EVERY=2 BATCH=4 ATTACK_BATCH=4
  LENGTH=32 VOCAB=300 MAX_CHARS=4000 LAYERS=1 HIDDEN=32
fi
D="$OUT/data"
EVALS=(--eval "retain=$D/retain_eval.jsonl" --eval "forget=$D/forget_eval.jsonl")
QUIET_ARG=(); [ "$QUIET" = 1 ] && QUIET_ARG=(--quiet)
COMMON=(--batch-size "$BATCH" --max-length "$LENGTH" --overwrite --log-every "$LOG_EVERY"
        "${QUIET_ARG[@]}")
n_alphas=$(wc -w <<< "$ALPHAS")
n_extra=$(wc -w <<< "$SEED_ALPHAS")
STAGE_COUNT=$(( 5 + n_alphas + (SEEDS - 1) * n_extra + 1 + (SEEDS - 1) + 1 ))

stage "data"
CORPORA=()
for f in $RETAIN_CORPUS; do CORPORA+=(--retain-corpus "$f"); done
for f in $FORGET_CORPUS; do CORPORA+=(--forget-corpus "$f"); done
[ -n "$MAX_CHARS" ] && CORPORA+=(--max-chars "$MAX_CHARS")
# shellcheck disable=SC2086 # DATA_ARGS holds several options
undo data language "$D" --seed "$SEED" --overwrite "${CORPORA[@]}" $DATA_ARGS

stage "tokenizer (byte-level BPE of $VOCAB tokens on both languages) and a random $ARCH"
SIZE=(--preset "$PRESET")
[ -n "$LAYERS" ] && SIZE+=(--layers "$LAYERS")
[ -n "$HIDDEN" ] && SIZE+=(--hidden "$HIDDEN" --intermediate "$((4 * HIDDEN))")
undo init "$OUT/init" --arch "$ARCH" "${SIZE[@]}" --tokenizer "bpe:$VOCAB" \
  --tokenizer-data "$D/retain_train.jsonl" --tokenizer-data "$D/forget_train.jsonl" \
  --seed "$SEED" --overwrite "${QUIET_ARG[@]}"

BASE=(--init "$OUT/init" --max-steps "$BASE_STEPS" --lr "$BASE_LR" --warmup-steps 50
      "${EVALS[@]}" --eval-every "$BASE_STEPS" "${COMMON[@]}" --seed "$SEED")
if [ "$THREADS" -ge 2 ]; then
  stage "train base (English + Korean) and oracle (English only), side by side"
  half=$((THREADS / 2))
  undo --threads "$((THREADS - half))" train "$OUT/base" --data "$D/retain_train.jsonl" \
    --data "$D/forget_train.jsonl:$FORGET_WEIGHT" "${BASE[@]}" & base_pid=$!
  undo --threads "$half" train "$OUT/oracle" --data "$D/retain_train.jsonl" "${BASE[@]}" \
    --quiet & oracle_pid=$!
  wait "$base_pid"
  wait "$oracle_pid"
  STAGE_NO=$((STAGE_NO + 1))
else
  stage "train base (English + Korean)"
  undo --threads "$THREADS" train "$OUT/base" --data "$D/retain_train.jsonl" \
    --data "$D/forget_train.jsonl:$FORGET_WEIGHT" "${BASE[@]}"
  stage "train oracle (English only, the data-filtering gold standard)"
  undo --threads "$THREADS" train "$OUT/oracle" --data "$D/retain_train.jsonl" "${BASE[@]}"
fi

stage "unlearn Korean (MaxEnt)"
undo --threads "$THREADS" unlearn "$OUT/base" "$OUT/unlearned" --method maxent \
  --forget "$D/forget_train.jsonl" --retain "$D/retain_train.jsonl" "${EVALS[@]}" \
  --eval-every "$UNLEARN_STEPS" --max-steps "$UNLEARN_STEPS" --lr "$UNLEARN_LR" \
  "${COMMON[@]}" --batch-size "$UNLEARN_BATCH" --seed "$SEED"

attack() {  # attack MODEL_DIR RESULTS_DIR SEED
  undo --threads "$THREADS" relearn-attack "$1" --data "$D/forget_train.jsonl" "${EVALS[@]}" \
    --forget-metric forget.loss --lrs "$ATTACK_LRS" --steps "$ATTACK_STEPS" \
    --eval-every "$EVAL_EVERY" --batch-size "$ATTACK_BATCH" --max-length "$LENGTH" \
    --eval-limit "$ATTACK_EVAL_LIMIT" --seed "$3" --out "$2" --overwrite "${QUIET_ARG[@]}"
}

REPORT=()
for ((k = 0; k < SEEDS; k++)); do
  seed=$((SEED + k))
  tag=""; [ "$k" -gt 0 ] && tag="-s$k"
  of=""; [ "$SEEDS" -gt 1 ] && of=", seed $seed ($((k + 1)) of $SEEDS)"
  alphas="$ALPHAS"; [ "$k" -gt 0 ] && alphas="$SEED_ALPHAS"
  for alpha in $alphas; do
    stage "UNDO alpha $alpha: noise (beta $BETA), distill on English, attack$of"
    undo --threads "$THREADS" distill "$OUT/undo-$alpha$tag" --teacher "$OUT/unlearned" \
      --student teacher --alpha "$alpha" --beta "$BETA" --perturb-seed "$seed" \
      --data "$D/retain_train.jsonl" "${EVALS[@]}" \
      --stop-when "retain.loss <= teacher * (1 + $RETAIN_TOL)" \
      --eval-every "$DISTILL_EVAL_EVERY" --max-steps "$DISTILL_MAX_STEPS" \
      --lr "$DISTILL_LR" --warmup-steps 20 "${COMMON[@]}" --seed "$seed"
    attack "$OUT/undo-$alpha$tag" "$OUT/attacks/undo-$alpha$tag" "$seed"
    REPORT+=("undo-$alpha=$OUT/attacks/undo-$alpha$tag")
  done
  stage "relearning attacks on base, unlearned and oracle$of"
  for model in base unlearned oracle; do
    echo "   attack on $model" >&2
    attack "$OUT/$model" "$OUT/attacks/$model$tag" "$seed"
    REPORT+=("$model=$OUT/attacks/$model$tag")
  done
done

finish_report "${REPORT[@]}"
