"""Option groups: torch-free dataclasses, each setting declared once with its flag and help.

Every setting a command takes is a field of one of these groups, declared with `option(...)`:
its default, its help text, its flag, its help panel and the values it accepts. The command
line is generated from the fields (`undo_cli.cli.options.with_options`, as mergekit builds its
click options from `MergeOptions`), and the library takes the same objects, so a new setting
is one field here plus the code that uses it. `check()` validates a group at parse time with
a message naming the flag (finite numbers, ranges, choices); a group's `validate()` adds the
checks that involve several fields.

Defaults that differ by command (learning rates, step budgets) are decided once, in
`COMMAND_DEFAULTS`; the ones that depend on the model or the method are decided where that
knowledge lives (`undo_cli.unlearn`'s method registry) and shown by `--help`.

Groups: `TrainConfig` (the engine: optimizer, schedule, budgets, state), `DataOptions` (how
training data becomes rows), `EvalOptions` (the evaluation every command that measures
shares), `NoiseOptions` (perturb, and distill's in-memory noise), `GateOptions`,
`LoadOptions`, `OutputOptions`, and one group per command (`UnlearnOptions`,
`DistillOptions`, `AttackConfig` with `AttackMeasurement`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError

SCHEDULES = ("constant", "linear", "cosine")
PACKING_MODES = ("documents", "concat", "none")
NOISES = ("xavier-uniform", "xavier-normal")  # the noise step's distributions (undo_cli.perturb)
CHOICE_FORMATS = ("qa", "letters", "raw")  # multiple-choice prompts (undo_cli.evaluate)
DEFAULT_PACKING = "documents"
# The paper's relearning grid: ten log-spaced learning rates from 1e-6 to 1e-3.
PAPER_LRS = (1e-6, 2.15e-6, 4.64e-6, 1e-5, 2.15e-5, 4.64e-5, 1e-4, 2.15e-4, 4.64e-4, 1e-3)

TRAINING = "Training"
DATA = "Data"
EVALUATION = "Evaluation"
IN_OUT = "Input and output"
METHOD = "Method"
DISTILLATION = "Distillation"
ATTACK = "Attack"
MEASUREMENT = "Measurement"
NOISE = "Noise"
SELECTION = "What trains"


def option(default: Any = None, help: str = "", *, flag: str | None = None,  # noqa: A002
           short: str | None = None, metavar: str | None = None, panel: str | None = None,
           cli: bool = True, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, choices: tuple[str, ...] | None = None,
           factory: Any = None, parse: Any = None) -> Any:
    """A dataclass field with what the command line and `check` need.

    `flag` defaults to `--field-name`; `minimum`/`maximum` bound a number (inclusive),
    `above` from below (exclusive); every float must be finite; `choices` lists the accepted
    strings. `cli=False` keeps the field out of the command line (set by the library);
    `parse` turns the text given on the command line into the field's value.
    """
    metadata = {"help": help, "flag": flag, "short": short, "metavar": metavar,
                "panel": panel, "cli": cli, "minimum": minimum, "above": above,
                "maximum": maximum, "choices": choices, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(f) -> str:
    """The command-line flag of dataclass field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check(group: Any) -> None:
    """`UsageError` naming the flag for a value outside what its field accepts."""
    for f in fields(group):
        value = getattr(group, f.name)
        meta = f.metadata
        if value is None or isinstance(value, bool) or "help" not in meta:
            continue
        name = flag_of(f)
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number (got {v})")
            if isinstance(v, int) and abs(v) > 2**63 - 1:
                raise UsageError(f"{name} is out of range (got {v})")
            if meta["minimum"] is not None and v < meta["minimum"]:
                raise UsageError(f"{name} must be at least {meta['minimum']:g} (got {v:g})")
            if meta["above"] is not None and not v > meta["above"]:
                raise UsageError(f"{name} must be greater than {meta['above']:g} (got {v:g})")
            if meta["maximum"] is not None and v > meta["maximum"]:
                raise UsageError(f"{name} must be at most {meta['maximum']:g} (got {v:g})")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise UsageError(f"{name} must be one of {', '.join(meta['choices'])} "
                             f"(got {value!r})")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of one training run (`undo_cli.engine.train`)."""

    lr: float | None = option(1e-4, "Peak learning rate (AdamW).", panel=TRAINING, above=0)
    min_lr: float = option(0.0, "Floor the linear/cosine decay ends at.", panel=TRAINING,
                           minimum=0)
    schedule: str = option("cosine", "Learning-rate schedule after warmup: constant, linear "
                           "or cosine.", panel=TRAINING, choices=SCHEDULES)
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to --lr.", panel=TRAINING,
                               minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to norms and "
                                 "biases).", panel=TRAINING, minimum=0)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.", cli=False)
    batch_size: int = option(8, "Examples per micro-batch, per data stream and per process.",
                             panel=TRAINING, minimum=1)
    grad_accum: int = option(1, "Micro-batches accumulated into one optimizer step.",
                             panel=TRAINING, minimum=1)
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this; 0 turns "
                                         "clipping off.", panel=TRAINING, minimum=0)
    max_steps: int | None = option(None, "Stop after this many optimizer steps.",
                                   panel=TRAINING, minimum=1)
    max_tokens: int | None = option(None, "Stop once this many tokens (all streams, all "
                                    "processes) were trained on.", panel=TRAINING, minimum=1)
    max_flops: float | None = option(None, "Stop once the FLOPs spent (trained model and "
                                     "frozen models) reach this.", panel=TRAINING, above=0)
    seed: int = option(0, "Seed of data order, sampling and dropout (a CPU run is repeatable "
                       "bit for bit).", panel=TRAINING)
    log_every: int = option(10, "Log (train_log.jsonl, progress) every N steps.",
                            panel=TRAINING, minimum=1)
    eval_every: int | None = option(None, "Evaluate every N steps (and at the end).",
                                    panel=EVALUATION, minimum=1)
    save_every: int | None = option(None, "Save the training state every N steps so that "
                                    "--resume can continue after an interruption.",
                                    panel=TRAINING, minimum=1)
    state_dir: Path | None = option(None, "Where training state is saved (default: "
                                    "OUT.undo-state beside OUT; removed after success).",
                                    panel=TRAINING)
    resume: bool = option(False, "Continue from the last saved training state (same "
                          "settings); the result equals an uninterrupted run.", panel=TRAINING)
    keep_last_finite: bool = option(False, "If training diverges (NaN/inf), write the last "
                                    "finite weights instead of failing.", panel=TRAINING)
    sam_rho: float = option(0.0, "Sharpness-aware minimisation with radius RHO (e.g. 0.05; 0: "
                            "off). Doubles the compute of a step.", flag="--sam",
                            metavar="RHO", panel=METHOD, minimum=0)
    bf16: bool = option(False, "bf16 autocast on CUDA (CPU always trains in fp32).",
                        panel=TRAINING)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: CUDA if available).",
                                panel=TRAINING)
    log_path: Path | None = option(None, "The JSONL training log.", cli=False)
    eval_at_start: bool = option(False, "Also evaluate before the first step.", cli=False)

    def validate(self) -> None:
        """`UsageError` (named as the command-line options) for impossible settings."""
        check(self)
        if self.lr is None:
            raise UsageError("--lr is not set")
        if self.min_lr > self.lr:
            raise UsageError(f"--min-lr must lie between 0 and --lr (got {self.min_lr:g})")
        if not all(0 <= b < 1 for b in self.betas):
            raise UsageError("AdamW betas must lie in [0, 1)")
        if self.max_steps is None and self.max_tokens is None and self.max_flops is None:
            raise UsageError("no training budget: give --max-steps or --max-tokens")
        if self.save_every is not None and self.state_dir is None:
            raise UsageError("--save-every needs a state directory")
        if self.resume and self.state_dir is None:
            raise UsageError("--resume needs a state directory")

    def state_dir_for(self, out: str | Path) -> Path:
        """`state_dir`, or its default `OUT.undo-state` beside the output directory."""
        if self.state_dir is not None:
            return Path(self.state_dir)
        out = Path(out)
        return out.parent / f"{out.name}.undo-state"

    def for_output(self, out: str | Path) -> TrainConfig:
        """This configuration with its state directory defaulted for output `out`."""
        return replace(self, state_dir=self.state_dir_for(out))

    def manifest(self) -> dict[str, Any]:
        """The settings that shape the result, as recorded in `undo.json`."""
        skip = ("log_path", "state_dir", "resume", "device", "eval_at_start")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# Settings whose change changes the result: resuming with other values is refused.
RESUME_KEYS = ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "betas",
               "batch_size", "grad_accum", "max_grad_norm", "max_steps", "max_tokens",
               "max_flops", "seed", "sam_rho", "bf16")


@dataclass
class DataOptions:
    """How training data becomes rows (`undo_cli.data`)."""

    max_length: int = option(256, "Row length in tokens: text is packed into rows of this "
                             "many tokens; the longest prompt + completion allowed.",
                             panel=DATA, minimum=2)
    packing: str = option("documents", "How {\"text\"} records fill --max-length rows: "
                          "documents (whole documents share a row, each attending only to "
                          "itself, positions restarting: what evaluation sees), concat (a "
                          "continuous stream cut into blocks: documents see each other; "
                          "long-document pretraining) or none (one document per row, padded). "
                          "Prompt/completion records are always one per row.", panel=DATA,
                          choices=PACKING_MODES)


@dataclass
class EvalOptions:
    """The evaluation of every command that measures while it works."""

    eval: list[str] = option(help="Held-out data evaluated every --eval-every steps and at "
                             "the end (metrics NAME.loss, NAME.accuracy, ...; repeatable).",
                             metavar="NAME=PATH", panel=EVALUATION, factory=list)
    eval_batch_size: int | None = option(None, "Batch size of evaluation (default: "
                                         "automatic).", panel=EVALUATION, minimum=1)
    max_new_tokens: int = option(32, "Greedy tokens generated per prompt when measuring "
                                 "accuracy.", panel=EVALUATION, minimum=1)
    choice_format: str = option("qa", "Prompt of multiple-choice sets ({question, choices, "
                                "answer}): qa ('Question: Q\\nAnswer:' + ' CHOICE'), letters "
                                "(the MMLU/WMDP layout: lettered choices, scores ' A', ' B', "
                                "...) or raw.", panel=EVALUATION, choices=CHOICE_FORMATS)


@dataclass
class LoadOptions:
    """How checkpoints are read."""

    allow_pickle: bool = option(False, "Allow loading pickled (.bin) weights.", panel=IN_OUT)
    trust_remote_code: bool = option(False, "Allow a checkpoint's custom code.", panel=IN_OUT)


@dataclass
class OutputOptions:
    """What a command prints and whether it may replace its output."""

    json: bool = option(False, "Print a JSON summary on stdout.", panel=IN_OUT)
    overwrite: bool = option(False, "Replace a non-empty OUT.", panel=IN_OUT)
    quiet: bool = option(False, "No progress bar or status lines.", short="-q", panel=IN_OUT)


# --------------------------------------------------------------------------------------------
# Per command
# --------------------------------------------------------------------------------------------


@dataclass
class UnlearnOptions:
    """Method options of `undo unlearn`; None means the method's own default."""

    retain_weight: float | None = option(None, "Weight a of the retain term. Default: 1 (rmu: "
                                         "1200, as in the WMDP paper).", metavar="A",
                                         panel=METHOD, minimum=0)
    beta: float = option(0.1, "npo: inverse temperature b (> 0; the NPO paper's 0.1). Small b "
                         "behaves like gradient ascent.", metavar="B", panel=METHOD, above=0)
    layer: int | None = option(None, "rmu: decoder layer (0-based) whose output is steered. "
                               "Default: min(7, layers/2 - 1): 7 as in the WMDP paper on deep "
                               "models, 0 on a 2-layer model.", metavar="L", panel=METHOD,
                               minimum=0)
    steering_coeff: float = option(6.5, "rmu: norm c of the target c * u of forget "
                                   "activations (WMDP paper: 6.5).", metavar="C",
                                   panel=METHOD, minimum=0)
    trainable: str | None = option(None, "Train only parameters whose name matches "
                                   "(re.search). Default: all; rmu: the MLP down-projections "
                                   "of layers L-2..L.", metavar="REGEX", panel=METHOD)
    repnoise: bool = option(False, "Add RepNoise: pull forget activations (every layer) "
                            "toward Gaussian noise (MMD) and ascend the forget loss.",
                            panel=METHOD)
    repnoise_alpha: float = option(1.0, "RepNoise weight of the ascent term "
                                   "-log(1 + CE(forget)).", panel=METHOD, minimum=0)
    repnoise_beta: float = option(1e-3, "RepNoise weight of the noise (MMD) term.",
                                  panel=METHOD, minimum=0)
    seed: int = option(0, "Seeds RMU's random direction u (the run's --seed).", cli=False)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DistillOptions:
    """What `undo distill` adds to the training settings."""

    perturb_seed: int = option(0, "Seed of the in-memory noise (as undo perturb --seed).",
                               panel=NOISE)
    temperature: float = option(1.0, "Softmax temperature of both models; the loss is "
                                "T^2 * KL.", panel=DISTILLATION, above=0)
    ce_weight: float = option(0.0, "Weight of the hard-label CE mixed into the loss "
                              "(paper: 0).", panel=DISTILLATION, minimum=0)
    kd_chunk_size: int = option(1024, "Positions per chunk of the KL computation: bounds peak "
                                "memory with large vocabularies (the result is the same for "
                                "any value).", panel=DISTILLATION, minimum=1)
    stop_when: str | None = option(None, "Stop at the first evaluation where EXPR holds, "
                                   "comparing student metrics with the teacher's, e.g. "
                                   "\"retain.accuracy >= teacher - 0.05\" or \"retain.loss <= "
                                   "teacher * 1.05\" (teacher = the teacher's value of the "
                                   "same metric; or teacher.SET.METRIC).", metavar="EXPR",
                                   panel=DISTILLATION)
    cache_teacher: Path | None = option(None, "Store the teacher's top-k outputs for the data "
                                        "stream in DIR (or read them back), so an alpha sweep "
                                        "runs the teacher once.", metavar="DIR",
                                        panel=DISTILLATION)
    cache_topk: int = option(64, "Teacher log-probabilities kept per position in the cache; "
                             "the rest is one bucket (exact when k >= vocabulary size).",
                             panel=DISTILLATION, minimum=1)
    train_pattern: str | None = option(None, "Train only parameters whose name matches "
                                       "(re.search), e.g. mlp (the paper's "
                                       "layer_types_to_train); the others are frozen, out of "
                                       "the optimizer. With --train-layers: both must hold.",
                                       flag="--train", metavar="REGEX", panel=SELECTION)
    train_layers: str | None = option(None, "Train only the parameters of these decoder "
                                      "layers, e.g. 10-15 or 0,2,4-6 (0-based; the paper's "
                                      "layers_to_train); embeddings, final norm, head frozen.",
                                      metavar="RANGE", panel=SELECTION)
    hidden_loss_weight: float = option(0.0, "Add W * the mean squared difference of the "
                                       "student's and the teacher's residual states, over the "
                                       "--hidden-layers and the distilled positions (the "
                                       "paper's use_activation_loss; 0: off).", metavar="W",
                                       panel=DISTILLATION, minimum=0)
    hidden_layers: str | None = option(None, "Decoder layers the hidden-state term compares, "
                                       "e.g. 10-15 (default: all; the last layer's state is "
                                       "after the final norm, as transformers returns it).",
                                       metavar="RANGE", panel=DISTILLATION)
    second_teacher: Path | None = option(None, "A second teacher (e.g. the model before "
                                         "unlearning; same tokenizer) giving the targets of "
                                         "some micro-batches (the paper's base_teacher with "
                                         "switch_teachers).", metavar="CKPT",
                                         panel=DISTILLATION)
    second_teacher_fraction: float | None = option(
        None, "Fraction P of the training micro-batches (not of tokens or records) whose "
        "targets come from --second-teacher: micro-batch i (counted over the run, the same "
        "on every process) goes to it when floor((i+1)P + o) > floor(iP + o), o in [0, 1) "
        "drawn from --seed, so any n consecutive micro-batches hold floor(nP) or ceil(nP) of "
        "them and the same seed picks the same ones.", metavar="P", panel=DISTILLATION,
        above=0, maximum=1)

    def validate(self) -> None:
        """`UsageError` for impossible combinations (checked before any work)."""
        check(self)
        if (self.second_teacher is None) != (self.second_teacher_fraction is None):
            raise UsageError("--second-teacher and --second-teacher-fraction go together")
        clash = ("--second-teacher" if self.second_teacher is not None else
                 "--hidden-loss-weight" if self.hidden_loss_weight > 0 else None)
        if self.cache_teacher is not None and clash:
            raise UsageError(f"--cache-teacher stores only the first teacher's top-k outputs: "
                             f"it cannot be combined with {clash}")
        if self.hidden_layers is not None and not self.hidden_loss_weight > 0:
            raise UsageError("--hidden-layers needs --hidden-loss-weight W > 0")


@dataclass
class AttackConfig:
    """One relearning attack (`undo relearn-attack`): the grid and what every run does.

    `train` is the template of every run's `TrainConfig`: its batch size, schedule, warmup,
    weight decay, accumulation, clipping, bf16 and device are used; lr, max_steps, seed and the
    evaluation settings are set per run. Runs use seeds `train.seed .. train.seed + seeds - 1`.
    Without attack data (`finetune` False) the attack only quantises, and needs `quantize`.
    """

    lrs: list[float] = option(help="Learning rates of the grid, e.g. 1e-5,1e-4. Default: the "
                              "paper's ten log-spaced values 1e-06 ... 0.001.",
                              metavar="LR,LR,...", panel=ATTACK, above=0,
                              factory=lambda: list(PAPER_LRS),
                              parse=lambda text: parse_lrs(text))
    steps: int = option(500, "Optimizer steps of every run.", panel=ATTACK, minimum=1)
    seeds: int = option(1, "Seeds per learning rate (averaged before the worst case).",
                        metavar="N", panel=ATTACK, minimum=1)
    lora: bool = option(False, "Attack with a LoRA adapter instead of full finetuning.",
                        panel=ATTACK)
    lora_rank: int = option(128, "LoRA rank (clipped to the narrowest wrapped layer of a tiny "
                            "model).", panel=ATTACK, minimum=1)
    lora_alpha: float = option(256.0, "LoRA alpha.", panel=ATTACK, above=0)
    lora_targets: str = option("all-linear", "Layers LoRA wraps: all-linear (every attention "
                               "and MLP projection, not the output head) or module names such "
                               "as q_proj,v_proj.", metavar="all-linear|NAME,NAME",
                               panel=ATTACK)
    lora_dropout: float = option(0.0, "LoRA dropout.", cli=False, minimum=0, maximum=1)
    quantize: int | None = option(None, "Round-to-nearest weight quantisation of the linear "
                                  "layers (symmetric, dequantised to float): of CKPT itself "
                                  "without --data, else of each run's final model.",
                                  metavar="8|4", panel=ATTACK)
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
    finetune: bool = option(True, "Whether there is attack data.", cli=False)
    train: TrainConfig = option(help="Every run's engine settings.", cli=False,
                                factory=lambda: TrainConfig(schedule="constant", max_steps=1))

    @property
    def mode(self) -> str:
        """"full" or "lora" finetuning, "none" without attack data (quantisation only)."""
        return "none" if not self.finetune else "lora" if self.lora else "full"

    @property
    def eval_every(self) -> int:
        """Steps between evaluations of every run (the template's, else the default)."""
        return self.train.eval_every or ATTACK_EVAL_EVERY

    def seed_list(self) -> list[int]:
        return [self.train.seed + i for i in range(self.seeds)]

    def validate(self) -> None:
        """`UsageError` (named as the command-line options) for impossible settings."""
        check(self)
        if self.quantize is not None or self.group_size is not None:
            if self.quantize is None:
                raise UsageError("--group-size needs --quantize")
            if self.quantize not in (4, 8):
                raise UsageError(f"--quantize must be 8 or 4 (got {self.quantize})")
        if not self.finetune:
            if self.quantize is None:
                raise UsageError("no attack data: give --data PATH (or --quantize 8|4 for a "
                                 "quantisation-only attack)")
            return
        if not self.lrs:
            raise UsageError("--lrs is empty: give at least one learning rate")
        if self.lora and not self.lora_targets.strip():
            raise UsageError("--lora-targets is empty")
        self.run_config(self.lrs[0], self.train.seed).validate()

    def run_config(self, lr: float, seed: int) -> TrainConfig:
        """The engine settings of the run at `lr` with `seed`."""
        return replace(self.train, lr=lr, max_steps=self.steps, max_tokens=None,
                       max_flops=None, seed=seed, eval_every=self.eval_every,
                       eval_at_start=False, keep_last_finite=True, log_path=None,
                       state_dir=None, save_every=None, resume=False)


@dataclass
class AttackMeasurement:
    """What `undo relearn-attack` measures and keeps, besides the eval sets."""

    forget_metric: str | None = option(None, "What the attacker recovers: NAME.accuracy / "
                                       "NAME.accuracy_norm (maximised) or NAME.loss / NAME.ppl "
                                       "(minimised). Default: forget.accuracy, else "
                                       "forget.loss.", metavar="NAME.METRIC",
                                       panel=MEASUREMENT)
    threshold: float | None = option(None, "Report the first step at which the worst case "
                                     "reaches this value (and the retain metrics there).",
                                     panel=MEASUREMENT)
    eval_limit: int | None = option(None, "Evaluate a seeded sample of N records per set.",
                                    metavar="N", panel=MEASUREMENT, minimum=1)
    save_models: bool = option(False, "Keep every attacked model under RESULTS_DIR/models "
                               "(LoRA runs as adapters on CKPT).", panel=IN_OUT)
    no_plot: bool = option(False, "Do not draw relearn.png.", panel=IN_OUT)


@dataclass
class GateOptions:
    """`--fail-if`: release gates on the measured numbers (`undo_cli.gates`)."""

    fail_if: list[str] = option(help="Exit with code 3 (after writing the results) if EXPR "
                                "holds (repeatable). Numbers, names, + - * /, comparisons, "
                                "and/or/not.", metavar="EXPR", panel=MEASUREMENT,
                                factory=list)


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


@dataclass
class NoiseOptions:
    """The noise step: (1 - alpha) * w + alpha * beta * N on the selected tensors
    (`undo perturb`, and `undo distill --student teacher` in memory)."""

    alpha: float | None = option(0.6, "Fraction of each weight replaced by noise, in [0, 1]: "
                                 "out = (1 - alpha) * w + alpha * beta * N. 0 leaves the "
                                 "weights unchanged.", panel=NOISE, minimum=0, maximum=1)
    beta: float | None = option(0.1, "Scale of the Xavier noise N (>= 0). --alpha 1 --beta 1 "
                                "is a fresh Xavier initialisation.", panel=NOISE, minimum=0)
    noise: str = option("xavier-uniform", "Noise distribution: xavier-uniform (the paper's) or "
                        "xavier-normal.", panel=NOISE, choices=NOISES)
    include: list[str] = option(help="Perturb only tensors whose name matches (repeatable; "
                                "others are copied unchanged).", metavar="REGEX", panel=NOISE,
                                factory=list)
    exclude: list[str] = option(help="Copy tensors whose name matches unchanged "
                                "(repeatable).", metavar="REGEX", panel=NOISE, factory=list)
    layers: str | None = option(None, "Perturb only the tensors of these decoder layers, e.g. "
                                "10-15 or 0,2,4-6 (0-based; llama/gemma2/qwen2 "
                                "model.layers.N., gpt2 transformer.h.N.); --include/--exclude "
                                "apply on top.", metavar="RANGE", panel=NOISE)

    def validate(self) -> None:
        check(self)
        if (self.alpha is None) != (self.beta is None):
            raise UsageError("--alpha and --beta go together: give both to noise the teacher "
                             "in memory (--student teacher), or neither")


# --------------------------------------------------------------------------------------------
# Defaults that differ by command: decided here, once; `--help` shows them.
# --------------------------------------------------------------------------------------------

TRAIN_STEPS = 1000  # `undo train` and `undo distill` without another budget
DISTILL_STOP_WHEN_CAP = 100 * TRAIN_STEPS  # --stop-when alone: a generous safety cap
DISTILL_EVAL_EVERY = 50  # --stop-when without --eval-every
ATTACK_EVAL_EVERY = 25

COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    # lr None: 1e-3 from a preset, 1e-4 from a checkpoint (`undo_cli.training.default_lr`).
    "train": {"lr": None, "max_steps": None},
    # lr and max_steps None: the method's own (`undo_cli.unlearn` registry).
    "unlearn": {"lr": None, "schedule": "constant", "max_steps": None},
    # No noise unless asked: the student is a checkpoint, `random`, or `teacher` with both.
    "distill": {"lr": 1e-3, "max_steps": None, "alpha": None, "beta": None},
    "relearn-attack": {"schedule": "constant", "eval_every": ATTACK_EVAL_EVERY},
}

COMMAND_HELP: dict[str, dict[str, str]] = {
    "train": {
        "lr": "Peak learning rate (AdamW). Default: 1e-3 from a preset, 1e-4 from a "
              "checkpoint.",
        "max_steps": f"Stop after this many optimizer steps. Default: {TRAIN_STEPS} unless "
                     "--max-tokens or --max-flops is given.",
    },
    "unlearn": {
        "lr": "Peak learning rate (AdamW). Default: the method's (see above): 5e-5 for models "
              "of 10M+ parameters (the paper sweeps 1e-5..8e-5), 1e-3 below (RMU: 1e-2).",
        "max_steps": "Stop after this many optimizer steps. Default: the method's, 100 (RMU: "
                     "500), unless --max-tokens or --max-flops is given.",
        "schedule": "Learning-rate schedule after warmup: constant (the paper's), linear or "
                    "cosine.",
        "batch_size": "Examples per micro-batch, per data stream (forget and retain) and per "
                      "process.",
    },
    "distill": {
        "lr": "Peak learning rate (AdamW). 1e-3 suits tiny models trained from a noised "
              "init; use ~1e-4 or lower for large models.",
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
        "eval": "Eval sets measured at step 0, every --eval-every steps and at the end "
                "(metrics NAME.loss, NAME.accuracy, ...; repeatable).",
        "eval_every": "Evaluate every N steps (and at step 0 and the last step).",
        "seed": "First seed: runs use seeds SEED .. SEED+N-1 (--seeds N) for data order.",
        "batch_size": "Examples per attack step and per process (N processes under a launcher "
                      "train on N times this).",
        "schedule": "Learning-rate schedule of each run: constant (default), linear or "
                    "cosine.",
    },
}
