"""Defaults that differ by command, decided here once: the stage functions take these groups
as their parameters' defaults (`train_checkpoint(..., train=TRAIN)`, as litgpt's
`setup(train=TrainArgs(...))`), the command line reads them from the command function's
signature (`undo_cli.cli.options.with_options`), and `--help` shows them with the numbers of
`rates.py` and the budgets below. (Never mutate them: `dataclasses.replace` makes a copy.)"""

from __future__ import annotations

from undo_cli.options.attack import ATTACK_EVAL_EVERY, LINEAR_EVALUATIONS
from undo_cli.options.groups import NoiseOptions, TrainConfig
from undo_cli.options.rates import (
    DISTILL_LR,
    FINETUNE_LR,
    PRESET_LR,
    RMU_TINY_LR,
    TINY_MODEL_PARAMS,
    UNLEARN_LR,
    UNLEARN_TINY_LR,
)


def rate_text(value: float) -> str:
    """1e-3 -> "1e-3" (as help texts write learning rates)."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


TRAIN_STEPS = 1000  # `undo train` and `undo distill` without another budget
DISTILL_STOP_WHEN_CAP = 100 * TRAIN_STEPS  # --stop-when alone: a generous safety cap
DISTILL_EVAL_EVERY = 50  # --stop-when without --eval-every
UNLEARN_STEPS = 100  # `undo unlearn` without another budget (the methods' own; RMU: 500)
RMU_STEPS = 500

# lr None: `default_lr` (PRESET_LR from a preset, FINETUNE_LR from a checkpoint); no budget:
# TRAIN_STEPS steps.
TRAIN = TrainConfig(lr=None)
# lr and max_steps None: the method's own (`default_lr` by the model's size; its budget).
UNLEARN = TrainConfig(lr=None, schedule="constant")
DISTILL = TrainConfig(lr=DISTILL_LR)
# No noise unless asked: the student is a checkpoint, `random`, or `teacher` with both.
DISTILL_NOISE = NoiseOptions(alpha=None, beta=None)
ATTACK_TRAIN = TrainConfig(schedule="constant", eval_every=ATTACK_EVAL_EVERY)

COMMAND_HELP: dict[str, dict[str, str]] = {
    "data arithmetic": {"overwrite": "Replace a non-empty OUT_DIR."},
    "data facts": {"overwrite": "Replace a non-empty OUT_DIR."},
    "report": {
        "overwrite": "Replace a non-empty REPORT_DIR.",
        "json": "Print report.json on stdout.",
    },
    "perturb": {
        "max_shard_size": "Re-shard the output into files of at most SIZE (e.g. 2GB, 500MB); "
                          "default: shard like the input.",
        "base_model": "With an adapter as IN: its base model's local directory, instead of the "
                      "hub name its adapter_config.json gives.",
    },
    "train": {
        "lr": f"Peak learning rate. Default: {rate_text(PRESET_LR)} from a preset, "
              f"{rate_text(FINETUNE_LR)} from a checkpoint.",
        "max_steps": f"Stop after this many optimizer steps. Default: {TRAIN_STEPS} unless "
                     "--max-tokens or --max-flops is given.",
    },
    "unlearn": {
        "lr": f"Peak learning rate. Default: the method's (see above): {rate_text(UNLEARN_LR)} for "
              f"models of {TINY_MODEL_PARAMS // 1_000_000}M+ parameters (the paper sweeps "
              "1e-5..8e-5), "
              f"{rate_text(UNLEARN_TINY_LR)} below (RMU: {rate_text(RMU_TINY_LR)}).",
        "max_steps": f"Stop after this many optimizer steps. Default: the method's, "
                     f"{UNLEARN_STEPS} (RMU: {RMU_STEPS}), unless --max-tokens or --max-flops "
                     "is given.",
        "schedule": "Learning-rate schedule after warmup: constant (the paper's), linear or "
                    "cosine.",
        "batch_size": "Examples per micro-batch, per data stream (forget and retain) and per "
                      "process.",
    },
    "distill": {
        "lr": f"Peak learning rate. {rate_text(DISTILL_LR)} suits tiny models trained from a "
              "noised init; use ~1e-4 or lower for large models.",
        "max_steps": f"Stop after this many optimizer steps. Default: {TRAIN_STEPS} unless "
                     "--max-tokens, --max-flops or --stop-when is given.",
        "eval_every": f"Evaluate every N steps (and at the end). Default with --stop-when: "
                      f"{DISTILL_EVAL_EVERY}.",
        "max_flops": "Stop once student + teacher FLOPs reach this.",
        "alpha": "With --student teacher: noise the teacher in memory, (1-alpha)*w + "
                 "alpha*beta*N, exactly as undo perturb (paper: 0.6).",
        "beta": "Noise scale with --alpha (paper: 0.1).",
        "include": "With --alpha: noise only tensors whose name matches (repeatable).",
        "exclude": "With --alpha: leave tensors whose name matches unnoised (repeatable).",
        "layers": "With --alpha: noise only the tensors of these decoder layers, e.g. 10-15 "
                  "(0-based). Without --layers/--include/--exclude but with --train or "
                  "--train-layers, only the trained parameters are noised (as the paper's "
                  "code: frozen weights keep the teacher's values).",
        "eval": "Sets measured on the teacher once and on the student every --eval-every steps "
                "(metrics NAME.loss, NAME.accuracy, ...); used by --stop-when.",
    },
    "eval": {
        "quiet": "Print nothing but errors (and --json's document): no status lines, table or "
                 "passed gates; the exit code says whether a gate failed.",
        "eval": "A data set to evaluate on (repeatable; --data is an alias, as in earlier "
                "versions). The record shape decides the metrics: text -> loss, ppl; prompt + "
                "completion/answer -> loss, greedy exact-match accuracy; question + choices + "
                "answer -> multiple-choice accuracy, accuracy_norm. PATH may also name a "
                "built-in set such as arithmetic:retain_eval.",
        "choice_format": "Multiple-choice prompt, each exactly lm-evaluation-harness's: qa "
                         "('Question: Q\\nAnswer:' + ' CHOICE', its ARC layout), letters (its "
                         "MMLU/WMDP layout: lettered choices, scores ' A', ' B', ...) or raw "
                         "(question and choice as given).",
        "until": "Stop strings of greedy generation (repeatable; lm-eval's until): the answer "
                 "is cut at the first one. Default: a newline. \\n and \\t are read as "
                 "newline and tab. EOS always stops. A prompt ending in whitespace is generated "
                 "from without it (the tokens training reads); lm-eval's generate_until keeps "
                 "it, which on a BPE model can cost all accuracy (docs/benchmarks.md).",
        "json": "Print one JSON object on stdout and nothing else.",
        "fail_if": "Exit with code 3 (after printing the results) if EXPR holds for any "
                   "checkpoint, e.g. \"forget.accuracy > 0.05\" (repeatable). Names: "
                   "SET.METRIC; with --reference also teacher.SET.METRIC (= "
                   "reference.SET.METRIC), e.g. \"retain.accuracy < teacher.retain.accuracy - "
                   "0.03\". Numbers, + - * /, comparisons, and/or/not.",
    },
    "relearn-attack": {
        "fail_if": "Exit with code 3 (after writing the results) if EXPR holds, e.g. "
                   "\"worst.forget.accuracy > 0.25\" (repeatable). Names: worst.SET.METRIC "
                   "(at the end of the worst case), initial.SET.METRIC, final, auc, "
                   "steps_to_threshold. Numbers, + - * /, comparisons, and/or/not.",
        "eval": "Eval sets measured at step 0, on the --eval-schedule and at the last step "
                "(metrics NAME.loss, NAME.accuracy, ...; repeatable).",
        "eval_every": "Evaluate every N steps (and at step 0 and the last step); with "
                      f"--eval-schedule log (the default) only for the first "
                      f"{LINEAR_EVALUATIONS} evaluations, the gap then doubling each time the "
                      "step doubles.",
        "seed": "First seed: runs use seeds SEED .. SEED+N-1 (--seeds N) for data order.",
        "batch_size": "Examples per attack step and per process (N processes under a launcher "
                      "train on N times this).",
        "schedule": "Learning-rate schedule of each run: constant (default), linear or "
                    "cosine.",
    },
}
