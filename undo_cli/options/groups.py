"""The option groups every command shares or a stage adds (`undo_cli.options`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.options.base import (
    DATA,
    DISTILLATION,
    EVALUATION,
    IN_OUT,
    MEASUREMENT,
    METHOD,
    NOISE,
    SELECTION,
    TRACKING,
    TRAINING,
    OptionGroup,
    named_path_option,
    option,
    seed_option,
    settle,
)
from undo_cli.options.rates import FINETUNE_LR
from undo_cli.options.text import (
    Condition,
    KeepBest,
    NamedPath,
    StopWhen,
    byte_size,
    conditions,
    keep_best,
    layer_range,
    pattern,
    patterns,
    stop_when,
)

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-nesterov", "adagrad", "adamw8bit", "paged_adamw8bit",
              "adafactor")
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")  # bitsandbytes (CUDA only; optional extra)
PACKING_MODES = ("documents", "concat", "none")
DEFAULT_PACKING = "documents"
DEFAULT_MAX_LENGTH = 256  # --max-length unless the model's maximum is smaller
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
NOISES = ("xavier-uniform", "xavier-normal")  # the noise step's distributions (undo_cli.perturb)
CHOICE_FORMATS = ("qa", "letters", "raw")  # multiple-choice prompts (undo_cli.evaluate)
# --report-to: the experiment trackers (accelerate's), the module each needs and its extra.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def check_trackers(report_to: list[str]) -> list[str]:
    """The trackers `--report-to` asks for (`none` dropped); `UsageError` with the `pip
    install` line for one that is not installed (checked before any work; torch-free)."""
    import importlib.util

    chosen = [t for t in dict.fromkeys(report_to or []) if t != "none"]
    for name in chosen:
        if name not in TRACKERS:
            raise UsageError(f"--report-to must be one of {', '.join(TRACKERS)} or none "
                             f"(got {name!r})")
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name}: {name} is not installed; add it with "
                             f"pip install 'undo-cli[{name}]' (or pip install {name})")
    return chosen


@dataclass
class TrainConfig(OptionGroup):
    """Settings of one training run (`undo_cli.engine.train`)."""

    optimizer: str = option("adamw", "Optimizer: adamw, adam, sgd (momentum 0.9), sgd-nesterov, "
                            "adagrad, adafactor (factored second moments: O(rows + cols) state "
                            "per matrix), adamw8bit or paged_adamw8bit (8-bit AdamW state; "
                            "CUDA and pip install 'undo-cli[bnb]').", panel=TRAINING,
                            choices=OPTIMIZERS)
    lr: float | None = option(FINETUNE_LR, "Peak learning rate.", panel=TRAINING, above=0)
    min_lr: float = option(0.0, "Floor the linear/cosine decay ends at.", panel=TRAINING,
                           minimum=0)
    schedule: str = option("cosine", "Learning-rate schedule after warmup: constant, linear "
                           "or cosine.", panel=TRAINING, choices=SCHEDULES)
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to --lr.", panel=TRAINING,
                               minimum=0)
    weight_decay: float = option(0.0, "Weight decay (decoupled for adamw, L2 otherwise; never "
                                 "applied to norms and biases).", panel=TRAINING, minimum=0)
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
    seed: int = seed_option("Seed of data order, sampling and dropout (a CPU run is repeatable "
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
    bf16: bool = option(False, "bf16 autocast on CUDA with fp32 master weights (CPU always "
                        "trains in fp32).", panel=TRAINING)
    bf16_weights: bool = option(False, "Pure bf16 training: the parameters, gradients and "
                                "optimizer state are bf16 (half the memory of fp32, less "
                                "precise updates). Works on CPU too (slowly).", panel=TRAINING)
    gradient_checkpointing: bool = option(False, "Recompute each decoder layer's activations "
                                          "in the backward pass instead of keeping them "
                                          "(transformers' checkpointing, use_reentrant=False): "
                                          "activation memory of about one layer instead of "
                                          "all, for about a third more compute per step.",
                                          panel=TRAINING)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: CUDA if available).",
                                panel=TRAINING)
    keep_best: KeepBest | None = option(None, "Write the weights of the best evaluation "
                                        "instead of the last: a metric (\"retain.accuracy\" "
                                        "is maximised, \"retain.loss\" minimised) or max/min "
                                        "of an expression, e.g. \"max retain.accuracy - "
                                        "forget.accuracy\". undo.json records its step and "
                                        "value.", metavar="METRIC", panel=EVALUATION,
                                        parse=keep_best)
    report_to: list[str] = option(help="Send loss, learning rate, throughput, every "
                                  "evaluation metric and the run's settings to an experiment "
                                  "tracker: tensorboard, wandb (offline), mlflow, trackio or "
                                  "none (repeatable).", metavar="TRACKER", panel=TRACKING,
                                  choices=TRACKERS + ("none",), factory=list)
    run_name: str | None = option(None, "The run's name in the trackers (default: OUT's "
                                  "name).", metavar="NAME", panel=TRACKING)
    logging_dir: Path | None = option(None, "Where trackers write (TensorBoard event files, "
                                      "W&B's offline run, MLflow's store). Default: "
                                      "OUT/runs, written as the run goes into OUT's "
                                      "temporary directory beside it.", metavar="DIR",
                                      panel=TRACKING)
    dry_run: bool = option(False, "Print the memory plan (parameters; bytes of weights, "
                           "gradients, optimizer state and activations per micro-batch under "
                           "these options and processes; whether it fits the device) and stop "
                           "before any work; nothing is written. Also: undo plan CMD ARGS.",
                           panel=TRAINING)
    log_path: Path | None = option(None, "The JSONL training log.", cli=False)
    eval_at_start: bool = option(False, "Also evaluate before the first step.", cli=False)

    def __post_init__(self) -> None:
        settle(self)
        if self.lr is not None and self.min_lr > self.lr:
            raise UsageError(f"--min-lr must lie between 0 and --lr (got {self.min_lr:g})")
        if not all(0 <= b < 1 for b in self.betas):
            raise UsageError("AdamW betas must lie in [0, 1)")

    def validate(self, *, lr_decided_later: bool = False) -> None:
        """`UsageError` (named as the command-line options) unless the run is complete: a
        learning rate (unless the stage decides it from the model, `lr_decided_later`), a
        budget, a state directory where one is needed. (Each value was checked when the group
        was built.)"""
        if self.lr is None and not lr_decided_later:
            raise UsageError("--lr is not set")
        if self.max_steps is None and self.max_tokens is None and self.max_flops is None:
            raise UsageError("no training budget: give --max-steps or --max-tokens")
        if self.save_every is not None and self.state_dir is None:
            raise UsageError("--save-every needs a state directory")
        if self.resume and self.state_dir is None:
            raise UsageError("--resume needs a state directory")
        check_trackers(self.report_to)

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
        skip = ("log_path", "state_dir", "resume", "device", "eval_at_start", "report_to",
                "run_name", "logging_dir", "dry_run")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# Settings whose change changes the result: resuming with other values is refused.
RESUME_KEYS = ("optimizer", "lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "betas",
               "batch_size", "grad_accum", "max_grad_norm", "max_steps", "max_tokens",
               "max_flops", "seed", "sam_rho", "bf16", "bf16_weights", "keep_best")


@dataclass
class DataOptions(OptionGroup):
    """How training data becomes rows (`undo_cli.data`)."""

    max_length: int | None = option(None, "Row length in tokens: text is packed into rows of "
                                    "this many tokens; the longest prompt + completion "
                                    f"allowed. Default: {DEFAULT_MAX_LENGTH}, or the model's "
                                    "maximum length if that is smaller.", panel=DATA,
                                    minimum=2)
    packing: str = option("documents", "How {\"text\"} records fill --max-length rows: "
                          "documents (whole documents share a row, each attending only to "
                          "itself, positions restarting: what evaluation sees), concat (a "
                          "continuous stream cut into blocks: documents see each other; "
                          "long-document pretraining) or none (one document per row, padded). "
                          "Prompt/completion records are always one per row.", panel=DATA,
                          choices=PACKING_MODES)


@dataclass
class EvalOptions(OptionGroup):
    """The evaluation of every command that measures while it works."""

    eval: list[NamedPath] = named_path_option(
        "--eval", "Held-out data evaluated every --eval-every steps and at the end (metrics "
        "NAME.loss, NAME.accuracy, ...; repeatable).", panel=EVALUATION)
    eval_batch_size: int | None = option(None, "Batch size of evaluation (default: "
                                         "automatic).", panel=EVALUATION, minimum=1)
    max_new_tokens: int = option(32, "Greedy tokens generated per prompt when measuring "
                                 "accuracy.", panel=EVALUATION, minimum=1)
    until: list[str] = option(help="Stop strings of greedy generation (repeatable; "
                              "lm-evaluation-harness's until): the answer is cut at the first "
                              "one. Default: a newline. \\n and \\t are read as newline and "
                              "tab. EOS always stops.", metavar="TEXT", panel=EVALUATION,
                              factory=list)
    choice_format: str = option("qa", "Prompt of multiple-choice sets ({question, choices, "
                                "answer}): qa ('Question: Q\\nAnswer:' + ' CHOICE'), letters "
                                "(the MMLU/WMDP layout: lettered choices, scores ' A', ' B', "
                                "...) or raw.", panel=EVALUATION, choices=CHOICE_FORMATS)

    @property
    def sets(self) -> list[tuple[str, str]]:
        """`--eval` as (NAME, PATH) pairs."""
        return [(spec.name, spec.path) for spec in self.eval]


@dataclass
class LoadOptions(OptionGroup):
    """How checkpoints are read."""

    allow_pickle: bool = option(False, "Allow loading pickled (.bin) weights.", panel=IN_OUT)
    trust_remote_code: bool = option(False, "Allow a checkpoint's custom code.", panel=IN_OUT)
    base_model: Path | None = option(None, "The base model of a PEFT adapter input: a local "
                                     "checkpoint directory, used instead of the hub name its "
                                     "adapter_config.json gives (as lm-eval's "
                                     "pretrained=BASE,peft=ADAPTER).", metavar="DIR",
                                     panel=IN_OUT)


@dataclass
class SaveOptions(OptionGroup):
    """How a command that writes a model stores its weights."""

    save_dtype: str = option("auto", "dtype of the written weights: auto (the input "
                             "checkpoint's: a bf16 model stays bf16; float32 for a new model), "
                             "float32, bfloat16 or float16. Training itself runs in fp32 on "
                             "CPU.", panel=IN_OUT, choices=SAVE_DTYPES)
    max_shard_size: str | None = option(None, "Split the written weights into files of at most "
                                        "SIZE (e.g. 2GB, 500MB). Default: shard like the input "
                                        "checkpoint (one file for a new model).",
                                        metavar="SIZE", panel=IN_OUT,
                                        parse=byte_size("--max-shard-size"))


@dataclass
class OutputOptions(OptionGroup):
    """What a command prints and whether it may replace its output."""

    json: bool = option(False, "Print a JSON summary on stdout.", panel=IN_OUT)
    overwrite: bool = option(False, "Replace a non-empty OUT.", panel=IN_OUT)
    quiet: bool = option(False, "No progress bar or status lines.", short="-q", panel=IN_OUT)


@dataclass
class UnlearnOptions(OptionGroup):
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
                                   "of layers L-2..L.", metavar="REGEX", panel=METHOD,
                                   parse=pattern("--trainable"))
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
class DistillOptions(OptionGroup):
    """What `undo distill` adds to the training settings."""

    perturb_seed: int = seed_option("Seed of the in-memory noise (as undo perturb --seed).",
                                    panel=NOISE)
    temperature: float = option(1.0, "Softmax temperature of both models; the loss is "
                                "T^2 * KL.", panel=DISTILLATION, above=0)
    ce_weight: float = option(0.0, "Weight of the hard-label CE mixed into the loss "
                              "(paper: 0).", panel=DISTILLATION, minimum=0)
    kd_chunk_size: int = option(1024, "Positions per chunk of the KL computation: bounds peak "
                                "memory with large vocabularies (the result is the same for "
                                "any value).", panel=DISTILLATION, minimum=1)
    stop_when: StopWhen | None = option(None, "Stop at the first evaluation where EXPR "
                                        "holds, comparing student metrics with the teacher's, "
                                        "e.g. \"retain.accuracy >= teacher - 0.05\" or "
                                        "\"retain.loss <= teacher * 1.05\" (teacher = the "
                                        "teacher's value of the same metric; or "
                                        "teacher.SET.METRIC).", metavar="EXPR",
                                        panel=DISTILLATION, parse=stop_when)
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
                                       flag="--train", metavar="REGEX", panel=SELECTION,
                                       parse=pattern("--train"))
    train_layers: str | None = option(None, "Train only the parameters of these decoder "
                                      "layers, e.g. 10-15 or 0,2,4-6 (0-based; the paper's "
                                      "layers_to_train); embeddings, final norm, head frozen.",
                                      metavar="RANGE", panel=SELECTION,
                                      parse=layer_range("--train-layers"))
    hidden_loss_weight: float = option(0.0, "Add W * the mean squared difference of the "
                                       "student's and the teacher's residual states, over the "
                                       "--hidden-layers and the distilled positions (the "
                                       "paper's use_activation_loss; 0: off).", metavar="W",
                                       panel=DISTILLATION, minimum=0)
    hidden_layers: str | None = option(None, "Decoder layers the hidden-state term compares, "
                                       "e.g. 10-15 (default: all; the last layer's state is "
                                       "after the final norm, as transformers returns it).",
                                       metavar="RANGE", panel=DISTILLATION,
                                       parse=layer_range("--hidden-layers"))
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

    def __post_init__(self) -> None:
        """`UsageError` for impossible combinations: such a group cannot exist."""
        settle(self)
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
class GateOptions(OptionGroup):
    """`--fail-if`: release gates on the measured numbers (`undo_cli.gates`)."""

    fail_if: list[Condition] = option(help="Exit with code 3 (after writing the results) if "
                                      "EXPR holds (repeatable). Numbers, names, + - * /, "
                                      "comparisons, and/or/not.", metavar="EXPR",
                                      panel=MEASUREMENT, factory=list,
                                      parse=conditions("--fail-if"), repeatable=True)


@dataclass
class NoiseOptions(OptionGroup):
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
                                factory=list, parse=patterns("--include"),
                                repeatable=True)
    exclude: list[str] = option(help="Copy tensors whose name matches unchanged "
                                "(repeatable).", metavar="REGEX", panel=NOISE, factory=list,
                                parse=patterns("--exclude"), repeatable=True)
    layers: str | None = option(None, "Perturb only the tensors of these decoder layers, e.g. "
                                "10-15 or 0,2,4-6 (0-based; llama/gemma2/qwen2/mistral/phi3 "
                                "model.layers.N., gpt2 transformer.h.N., gpt_neox "
                                "gpt_neox.layers.N.); --include/--exclude "
                                "apply on top.", metavar="RANGE", panel=NOISE,
                                parse=layer_range("--layers"))

    def __post_init__(self) -> None:
        settle(self)
        if (self.alpha is None) != (self.beta is None):
            raise UsageError("--alpha and --beta go together: give both to noise the teacher "
                             "in memory (--student teacher), or neither")
