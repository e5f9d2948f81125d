"""The relearning attack's settings (`undo relearn-attack`): the adversary's space and what is
measured. `AttackConfig.grid()` is every finetuning run of the grid as a `RunSpec`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from undo_cli.errors import UsageError
from undo_cli.options.base import (
    ATTACK,
    EVALUATION,
    IN_OUT,
    MEASUREMENT,
    OptionGroup,
    option,
)
from undo_cli.options.groups import OPTIMIZERS, TrainConfig
from undo_cli.options.paths import sqlite_path, weighted_paths
from undo_cli.options.storage import parse_search_storage
from undo_cli.options.text import ModuleNames, module_names


def _log_grid(low: float, high: float, n: int = 10) -> tuple[float, ...]:
    """`n` log-spaced values from `low` to `high`, rounded to 3 significant digits."""
    step = (math.log10(high) - math.log10(low)) / (n - 1)
    return tuple(float(f"{10 ** (math.log10(low) + i * step):.3g}") for i in range(n))


# The paper's relearning grid: ten log-spaced learning rates from 1e-6 to 1e-3.
PAPER_LRS = (1e-6, 2.15e-6, 4.64e-6, 1e-5, 2.15e-5, 4.64e-5, 1e-4, 2.15e-4, 4.64e-4, 1e-3)
# Each optimizer's default grid when --lrs is not given (SGD needs ~100x Adam's rates).
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "adamw": PAPER_LRS, "adam": PAPER_LRS, "sgd": _log_grid(1e-4, 1e-1),
    "sgd-nesterov": _log_grid(1e-4, 1e-1), "adagrad": _log_grid(1e-5, 1e-2),
    "adafactor": PAPER_LRS, "adamw8bit": PAPER_LRS, "paged_adamw8bit": PAPER_LRS,
}
ATTACK_SCHEDULES = ("constant", "cosine", "warmup-cosine", "linear")
WARMUP_SHARE = 0.1  # warmup-cosine: linear warmup over this share of the steps, then cosine
ATTACK_EVAL_EVERY = 25
EVAL_SCHEDULES = ("log", "linear")  # --eval-schedule
LINEAR_EVALUATIONS = 20  # --eval-schedule log: evaluations at the first gap before it doubles
SEARCH_BATCH_SIZES = (4, 16, 64)  # --search without --batch-sizes
SEARCH_LORA_RANKS = (8, 32, 128)  # --search over LoRA ranks (clipped for tiny models)
QUANTIZE_SCHEMES = ("nf4", "int8", "int4")  # library quantisers (undo_cli.quantize.SCHEMES)
PRUNE_METHODS = ("magnitude", "wanda")


def parse_quantize(text: str | int | None) -> int | str | None:
    """`--quantize`: 8 or 4 (round-to-nearest, as before) or a library scheme."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip().lower()
    if value in ("8", "4"):
        return int(value)
    if value in QUANTIZE_SCHEMES:
        return value
    raise UsageError(f"--quantize must be 8 or 4 (round-to-nearest) or one of "
                     f"{', '.join(QUANTIZE_SCHEMES)} (got {text!r})")


def parse_prune(text: str | tuple | None) -> tuple[str, float] | None:
    """`--prune magnitude:S|wanda:S` -> (method, sparsity S in (0, 1))."""
    if text is None or isinstance(text, tuple):
        return text
    method, sep, amount = str(text).partition(":")
    method = method.strip().lower()
    try:
        sparsity = float(amount)
    except ValueError:
        sparsity = math.nan
    if not sep or method not in PRUNE_METHODS or not 0 < sparsity < 1:
        raise UsageError(f"--prune must be magnitude:S or wanda:S with a sparsity 0 < S < 1 "
                         f"(got {text!r})")
    return method, sparsity


def parse_list(kind: type, option_name: str):
    """A parser of comma-separated values of `kind` (for `--optimizers adam,sgd` etc.)."""

    def parse(text: str | list | None) -> list | None:
        if text is None:
            return None
        parts = text.replace(";", ",").split(",") if isinstance(text, str) else list(text)
        values = []
        for part in (str(p).strip() for p in parts):
            if not part:
                continue
            try:
                values.append(kind(part))
            except ValueError:
                raise UsageError(f"{option_name}: {part!r} is not a valid value") from None
        if not values:
            raise UsageError(f"{option_name} is empty")
        if len(set(values)) != len(values):
            raise UsageError(f"{option_name} lists {next(v for v in values if values.count(v) > 1)}"
                             " twice")
        return values

    return parse


def parse_lrs(text: str | list[float] | tuple[float, ...] | None) -> list[float]:
    """`"1e-5,1e-4"` (or a list) -> [1e-5, 1e-4]; None -> the paper's grid. `UsageError` for
    an empty list, a value that is not a positive number, or a value given twice."""
    if text is None:
        return list(PAPER_LRS)
    if isinstance(text, str):
        values = []
        for part in (p.strip() for p in text.replace(";", ",").split(",")):
            if not part:
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise UsageError(f"--lrs: {part!r} is not a number (give e.g. "
                                 "--lrs 1e-5,1e-4,1e-3)") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise UsageError("--lrs is empty: give at least one learning rate, e.g. "
                         "--lrs 1e-5,1e-4")
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"--lrs: every learning rate must be positive (got {v:g})")
    if len(set(values)) != len(values):
        raise UsageError(f"--lrs lists {next(v for v in values if values.count(v) > 1):g} twice")
    return values


def evaluation_steps(steps: int, every: int, schedule: str = "log") -> list[int]:
    """The steps after step 0 at which a run of `steps` optimizer steps is evaluated, in
    order; the last is always `steps`.

    `linear`: every `every` steps. `log`: the same for the first `LINEAR_EVALUATIONS`
    evaluations (through step 20 x `every`, so a shorter run is evaluated as by `linear`),
    then the gap doubles each time the step doubles (every 2 x `every` steps through step
    40 x `every`, every 4 x `every` through 80 x `every`, ...): 10 more evaluations per doubling
    of the run, so their number grows with the logarithm of `steps`, and the gap stays between
    5% and 10% of the step reached. Every step but the last is a multiple of `every`, where
    the engine calls the evaluation hook.
    """
    if schedule not in EVAL_SCHEDULES:
        raise UsageError(f"--eval-schedule must be one of {', '.join(EVAL_SCHEDULES)} "
                         f"(got {schedule!r})")
    if steps < 1 or every < 1:
        raise UsageError(f"--steps and --eval-every must be at least 1 (got {steps}, {every})")
    points: list[int] = []
    step, gap = 0, every
    while True:
        if schedule == "log" and step >= LINEAR_EVALUATIONS * gap:
            gap *= 2
        step += gap
        if step >= steps:
            break
        points.append(step)
    return [*points, steps]


@dataclass(frozen=True)
class RunSpec:
    """One finetuning run of an attack: its configuration and seed."""

    lr: float
    seed: int
    optimizer: str = "adamw"
    schedule: str = "constant"
    batch_size: int = 8
    lora_rank: int | None = None  # None: full finetuning
    lora_alpha: float | None = None  # LoRA's alpha (scale alpha / rank); None without LoRA

    @property
    def config_id(self) -> str:
        """The configuration (everything but the seed) as a short stable name."""
        mode = f" lora-r{self.lora_rank}" if self.lora_rank else ""
        return f"{self.optimizer} {self.schedule} bs{self.batch_size} lr{self.lr:g}{mode}"

    def describe(self) -> dict:
        return {"lr": self.lr, "seed": self.seed, "optimizer": self.optimizer,
                "schedule": self.schedule, "batch_size": self.batch_size,
                "mode": "lora" if self.lora_rank else "full", "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha}


@dataclass
class AttackConfig(OptionGroup):
    """One relearning attack (`undo relearn-attack`): the adversary's space and each run.

    The grid is the product of `optimizers`, `schedules`, `batch_sizes` and learning rates
    (`lrs`, or each optimizer's `DEFAULT_LRS`), for `seeds` seeds (`train.seed` ..
    `train.seed + seeds - 1`); with `search` N, an Optuna study of N runs over the same space
    replaces the product. `train` is the template of every run's `TrainConfig` (warmup,
    weight decay, accumulation, clipping, bf16, device; and the schedule and batch size when
    the lists are not given). Without attack data (`finetune` False) only the attacks without
    finetuning run (`quantize` of CKPT, `few_shot`, `ablate_direction`).
    """

    lrs: list[float] | None = option(None, "Learning rates of the grid, e.g. 1e-5,1e-4. "
                                     "Default: each optimizer's ten log-spaced values: "
                                     "adamw and adam the paper's 1e-06 ... 0.001, sgd and "
                                     "sgd-nesterov 1e-4 ... 0.1, adagrad 1e-5 ... 0.01.",
                                     metavar="LR,LR,...", panel=ATTACK, above=0,
                                     parse=lambda text: parse_lrs(text))
    optimizers: list[str] = option(help="Optimizers of the grid: adamw (default), adam, sgd, "
                                   "sgd-nesterov, adagrad, adafactor, adamw8bit, "
                                   "paged_adamw8bit (comma-separated; as --optimizer).",
                                   metavar="NAME,NAME", panel=ATTACK, choices=OPTIMIZERS,
                                   factory=lambda: ["adamw"],
                                   parse=lambda text: parse_list(str, "--optimizers")(text))
    schedules: list[str] | None = option(None, "Learning-rate schedules of the grid: "
                                         "constant, cosine, warmup-cosine (10% warmup), "
                                         "linear. Default: --schedule.", metavar="NAME,NAME",
                                         panel=ATTACK, choices=ATTACK_SCHEDULES,
                                         parse=lambda text: parse_list(str, "--schedules")(text))
    batch_sizes: list[int] | None = option(None, "Batch sizes of the grid (per process), e.g. "
                                           "4,16,64. Default: --batch-size.", metavar="N,N",
                                           panel=ATTACK, minimum=1,
                                           parse=lambda text: parse_list(
                                               int, "--batch-sizes")(text))
    steps: int = option(500, "Optimizer steps of every run.", panel=ATTACK, minimum=1)
    eval_schedule: str = option(
        "log", "When each run is evaluated (besides step 0 and its last step). log: every "
        f"--eval-every N steps for the first {LINEAR_EVALUATIONS} evaluations (through step "
        f"{LINEAR_EVALUATIONS} x N: shorter runs are evaluated as by linear), then the gap "
        "doubles each time the step doubles (every 2N steps through step 40N, 4N through 80N, "
        "...): 10 more evaluations per doubling of --steps (at N 25: 40 evaluations for "
        "--steps 2000, 63 for 10000), so long runs stay cheap; the AUC is the trapezoid over "
        "the uneven steps and the last step is always evaluated. linear: every N steps "
        "throughout (the only schedule before).", metavar="log|linear", panel=EVALUATION,
        choices=EVAL_SCHEDULES)
    seeds: int = option(1, "Seeds per configuration (averaged before the worst case).",
                        metavar="N", panel=ATTACK, minimum=1)
    search: int | None = option(None, "Instead of the full grid, an Optuna study (TPE sampler "
                                "seeded by --seed, median pruner on the evaluation curve) of N "
                                "runs over the same space: learning rate log-uniform over the "
                                "grid's range, optimizer, schedule, batch size (default "
                                "4,16,64), LoRA or full and LoRA rank (8, 32, 128; LoRA only "
                                "with --lora). Needs optuna (pip install 'undo-cli[search]').",
                                metavar="N", panel=ATTACK, minimum=1)
    search_storage: str | None = option(None, "Keep the study in this Optuna storage (e.g. "
                                        "sqlite:///attack.db) so that an interrupted search "
                                        "resumes: finished trials are reused, the study runs "
                                        "until it has --search trials.", metavar="URL",
                                        panel=ATTACK, parse=parse_search_storage,
                                        reads=sqlite_path)
    lora: bool = option(False, "Attack with a LoRA adapter instead of full finetuning.",
                        panel=ATTACK)
    lora_rank: int = option(128, "LoRA rank (clipped to the narrowest wrapped layer of a tiny "
                            "model).", panel=ATTACK, minimum=1)
    lora_alpha: float | None = option(None, "LoRA alpha: the adapter's update is scaled by "
                                      "alpha / rank. Default: 2 x the rank used (after "
                                      "clipping, or as a search picks it), the usual "
                                      "practice; results.json records both.", metavar="ALPHA",
                                      panel=ATTACK, above=0)
    lora_targets: ModuleNames = option("all-linear", "Layers LoRA wraps: all-linear (every "
                                       "attention and MLP projection, not the output head) or "
                                       "module names such as q_proj,v_proj.",
                                       metavar="all-linear|NAME,NAME", panel=ATTACK,
                                       parse=module_names)
    lora_dropout: float = option(0.0, "LoRA dropout.", cli=False, minimum=0, maximum=1)
    quantize: int | str | None = option(
        None, "Weight quantisation of the linear layers, stored dequantised: 8 or 4 is undo's "
        "round-to-nearest (symmetric); nf4 and int8 use bitsandbytes (NF4 blocks of 64, "
        "LLM.int8 row-wise absmax; on CUDA and on CPU), int4 optimum-quanto's qint4 (affine, "
        "groups of 128) (pip install 'undo-cli[quantize]'). Of CKPT itself, and of each run's "
        "final model when finetuning; with --qlora also quantised finetuning.",
        metavar="8|4|nf4|int8|int4", panel=ATTACK, parse=lambda text: parse_quantize(text))
    qlora: bool = option(False, "With --quantize: also finetune LoRA adapters on the "
                         "quantised model (QLoRA, the quantised-finetuning attack), as runs of "
                         "their own.", panel=ATTACK)
    prune: tuple[str, float] | None = option(
        None, "Prune the linear layers to sparsity S: magnitude (the smallest |W| of each "
        "layer) or wanda (the smallest |W_ij| * ||X_j|| of each output row, activation norms "
        "from 128 rows of --data). Evaluated alone and, with finetuning, as the start of "
        "runs of its own.", metavar="magnitude:S|wanda:S", panel=ATTACK,
        parse=lambda text: parse_prune(text))
    embedding_attack: int | None = option(
        None, "Optimise a soft prompt (--prompt-tokens embeddings before every input) on "
        "--data for STEPS steps with the weights frozen, evaluating with it.",
        metavar="STEPS", panel=ATTACK, minimum=1)
    prompt_tokens: int = option(8, "Soft-prompt length of --embedding-attack.", metavar="N",
                                panel=ATTACK, minimum=1)
    prompt_lr: float = option(1e-2, "Learning rate (AdamW) of --embedding-attack.",
                              metavar="LR", panel=ATTACK, above=0)
    benign_data: list[str] | None = option(
        None, "Also finetune on data with no forget content (any --data format; the "
        "out-of-domain relearning attack), every configuration of the grid, as runs of their "
        "own.", metavar="FILE", panel=ATTACK, reads=weighted_paths,
        parse=lambda text: parse_list(str, "--benign-data")(text))
    group_size: int | None = option(None, "With --quantize: one scale per G input weights "
                                    "(default: per output channel).", metavar="G",
                                    panel=ATTACK, minimum=1)
    shrink_perturb: float | None = option(None, "Before the attack, shrink and noise the "
                                          "model to (1 - A) w + A B N as undo perturb, seeded "
                                          "by --seed (the paper's shrink_perturb_relearning); "
                                          "step 0 measures the noised model.", metavar="A",
                                          panel=ATTACK, above=0, maximum=1)
    shrink_perturb_beta: float = option(0.1, "Noise scale B of --shrink-perturb (the paper's "
                                        "0.1; 0: shrink only).", metavar="B", panel=ATTACK,
                                        minimum=0)
    few_shot: int | None = option(None, "Also attack without finetuning by prompting: K "
                                  "forget-domain demonstrations from --data (seeded, K per "
                                  "prompt) before every evaluation prompt, as "
                                  "lm-evaluation-harness's num_fewshot.", metavar="K",
                                  panel=ATTACK, minimum=1)
    ablate_direction: bool = option(False, "Also attack without finetuning by directional "
                                    "ablation: per layer, the difference of the mean residual "
                                    "states of forget (--data) and retain (the retain eval "
                                    "set) prompts, projected out of every weight that writes "
                                    "to the residual stream; every layer is tried.",
                                    panel=ATTACK)
    no_finetune: bool = option(False, "Run only the attacks without finetuning (--quantize of "
                               "CKPT, --few-shot, --ablate-direction); --data then only "
                               "provides demonstrations and directions.", panel=ATTACK)
    finetune: bool = option(True, "Whether finetuning runs (attack data given).", cli=False)
    train: TrainConfig = option(help="Every run's engine settings.", cli=False,
                                factory=lambda: TrainConfig(schedule="constant", max_steps=1))

    @property
    def mode(self) -> str:
        """"full" or "lora" finetuning, "none" without it."""
        return "none" if not self.finetune else "lora" if self.lora else "full"

    @property
    def eval_every(self) -> int:
        """Steps between evaluations of every run (the template's, else the default): the
        first gap of `eval_schedule`."""
        return self.train.eval_every or ATTACK_EVAL_EVERY

    def eval_steps(self, steps: int | None = None) -> list[int]:
        """The steps after 0 at which a run of `steps` (default `self.steps`) steps is
        evaluated (`evaluation_steps`)."""
        return evaluation_steps(steps or self.steps, self.eval_every, self.eval_schedule)

    def seed_list(self) -> list[int]:
        return [self.train.seed + i for i in range(self.seeds)]

    def lr_grid(self, optimizer: str) -> list[float]:
        """The learning rates `optimizer` runs at: `lrs`, or its default grid."""
        return list(self.lrs) if self.lrs else list(DEFAULT_LRS[optimizer])

    def schedule_list(self) -> list[str]:
        return list(self.schedules) if self.schedules else [self.train.schedule]

    def batch_size_list(self) -> list[int]:
        return list(self.batch_sizes) if self.batch_sizes else [self.train.batch_size]

    def alpha_for(self, rank: int | None) -> float | None:
        """LoRA's alpha for an adapter of `rank`: --lora-alpha, or 2 x rank (None: no LoRA)."""
        if not rank:
            return None
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * rank

    def grid(self, lora_rank: int | None = None) -> list[RunSpec]:
        """Every finetuning run of the full grid, seeds innermost (`lora_rank`: the clipped
        rank of a LoRA attack)."""
        rank = lora_rank if self.lora else None
        return [RunSpec(lr=lr, seed=seed, optimizer=opt, schedule=schedule, batch_size=bs,
                        lora_rank=rank, lora_alpha=self.alpha_for(rank))
                for opt in self.optimizers for schedule in self.schedule_list()
                for bs in self.batch_size_list() for lr in self.lr_grid(opt)
                for seed in self.seed_list()]

    def validate(self) -> None:
        """`UsageError` (named as the command-line options) for an attack that cannot run
        (once the library has set `finetune` and `train`; each value was checked when the
        group was built)."""
        if self.quantize is not None or self.group_size is not None:
            if self.quantize is None:
                raise UsageError("--group-size needs --quantize")
            if self.quantize not in (4, 8, *QUANTIZE_SCHEMES):
                raise UsageError(f"--quantize must be 8, 4, {', '.join(QUANTIZE_SCHEMES)} "
                                 f"(got {self.quantize})")
            if isinstance(self.quantize, str) and self.group_size is not None:
                raise UsageError("--group-size applies to --quantize 8|4 only (the library "
                                 "schemes have their own blocks)")
        if self.qlora and self.quantize is None:
            raise UsageError("--qlora needs --quantize")
        if self.qlora and not self.finetune:
            raise UsageError("--qlora finetunes: give --data PATH")
        if self.prompt_tokens != 8 and self.embedding_attack is None:
            raise UsageError("--prompt-tokens needs --embedding-attack STEPS")
        if self.search_storage is not None and self.search is None:
            raise UsageError("--search-storage needs --search N")
        parse_search_storage(self.search_storage)
        if not self.finetune:
            if (self.quantize is None and self.few_shot is None and not self.ablate_direction
                    and self.prune is None and self.embedding_attack is None
                    and not self.benign_data):
                raise UsageError("nothing to attack with: give --data PATH (finetuning), or "
                                 "--quantize 8|4|nf4|int8|int4, --prune, --benign-data, "
                                 "--few-shot K or --ablate-direction")
            return
        if self.lrs is not None and not self.lrs:
            raise UsageError("--lrs is empty: give at least one learning rate")
        if self.lora and not self.lora_targets.modules:
            raise UsageError("--lora-targets is empty")
        for schedule in self.schedule_list():
            if schedule not in ATTACK_SCHEDULES:
                raise UsageError(f"--schedules must be one of {', '.join(ATTACK_SCHEDULES)} "
                                 f"(got {schedule!r})")
        self.run_config(self.grid(1)[0]).validate()

    def run_config(self, spec: RunSpec) -> TrainConfig:
        """The engine settings of run `spec`."""
        schedule, warmup = spec.schedule, self.train.warmup_steps
        if schedule == "warmup-cosine":
            schedule, warmup = "cosine", max(1, round(WARMUP_SHARE * self.steps))
        return replace(self.train, lr=spec.lr, optimizer=spec.optimizer, schedule=schedule,
                       warmup_steps=warmup, batch_size=spec.batch_size, max_steps=self.steps,
                       max_tokens=None, max_flops=None, seed=spec.seed,
                       eval_every=self.eval_every, eval_at_start=False, keep_last_finite=True,
                       log_path=None, state_dir=None, save_every=None, resume=False,
                       keep_best=None)


@dataclass
class AttackMeasurement(OptionGroup):
    """What `undo relearn-attack` measures and keeps, besides the eval sets."""

    forget_metric: str | None = option(None, "What the attacker recovers: NAME.accuracy / "
                                       "NAME.accuracy_norm (maximised) or NAME.loss / NAME.ppl "
                                       "(minimised). Default: forget.accuracy, else "
                                       "forget.loss.", metavar="NAME.METRIC",
                                       panel=MEASUREMENT)
    retain_metric: str | None = option(None, "The utility the attacker must keep, for "
                                       "--max-retain-drop (and the retain set of "
                                       "--ablate-direction). Default: retain.accuracy, else "
                                       "retain.loss, when a set named retain is given.",
                                       metavar="NAME.METRIC", panel=MEASUREMENT)
    max_retain_drop: float | None = option(None, "An evaluation at which a run's retain "
                                           "metric is more than D worse than the unattacked "
                                           "model's does not count toward the worst case "
                                           "(TamperBench's utility rule: an attack that "
                                           "destroys the model does not count). In the "
                                           "metric's units: 0.1 = 10 points of accuracy, or "
                                           "+0.1 nats of loss. Default: off.", metavar="D",
                                           panel=MEASUREMENT, minimum=0)
    threshold: float | None = option(None, "Report the first step at which the worst case "
                                     "reaches this value (and the retain metrics there).",
                                     panel=MEASUREMENT)
    eval_limit: int | None = option(None, "Evaluate a seeded sample of N records per set.",
                                    metavar="N", panel=MEASUREMENT, minimum=1)
    save_models: bool = option(False, "Keep every attacked model under RESULTS_DIR/models "
                               "(LoRA runs as adapters on CKPT).", panel=IN_OUT)
    no_plot: bool = option(False, "Do not draw relearn.png.", panel=IN_OUT)
    log_samples: bool = option(False, "Write RESULTS_DIR/samples.jsonl: one line per evaluated "
                               "item of the unattacked model and of each finetuning run's last "
                               "evaluation (prompt, choices or target, log-likelihoods or "
                               "generated text, correct or not), as lm-evaluation-harness's "
                               "--log_samples.", panel=IN_OUT)

