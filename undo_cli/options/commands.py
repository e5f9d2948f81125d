"""The option groups of the commands that do not train: `undo init`, `undo eval`, `undo probe`,
`undo report`, what `undo perturb` adds to the noise step, and `undo`'s own options before the
command (`undo_cli.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from undo_cli.errors import UsageError
from undo_cli.gates import rewrite_string_tests
from undo_cli.options.base import NOISE, OptionGroup, option, seed_option, settle
from undo_cli.options.paths import plain_paths
from undo_cli.options.text import BPE_NEEDS_DATA, Condition, conditions, tokenizer_spec
from undo_cli.stats import BOOTSTRAP_SAMPLES

MAX_BOOTSTRAP_SAMPLES = 10**7
TRAIN_SHARE = 0.6  # `undo probe --train-share`: share of the records the probes are fitted on


@dataclass
class InitOptions(OptionGroup):
    """`undo init`: the architecture, size and tokenizer of a new random model."""

    arch: str = option("llama", "Architecture: llama, gemma2, gpt2, qwen2, mistral (Zephyr), "
                       "gpt_neox (Pythia, Deep Ignorance) or phi3.")
    preset: str = option("tiny", "Size preset: tiny (~0.5M params: 2 layers, 128 wide) or small "
                         "(~10M: 6 layers, 384 wide). Explicit sizes override it.")
    layers: int | None = option(None, "Number of transformer layers.", minimum=1)
    hidden: int | None = option(None, "Hidden (model) width.", minimum=1)
    heads: int | None = option(None, "Attention heads (must divide --hidden).", minimum=1)
    intermediate: int | None = option(None, "MLP inner width.", minimum=1)
    max_position: int | None = option(None, "Longest sequence the model accepts.", minimum=1)
    tokenizer: str = option("char", "'char' (printable ASCII, one token per character); "
                            "'char:ALPHABET' (one token per character of ALPHABET, any Unicode "
                            "characters as written; backslash escapes such as \\n or \\u00e4 "
                            "work too); 'bpe:N' (a byte-level BPE of N tokens, N >= 260, "
                            "trained on --tokenizer-data: any language round-trips); a "
                            "tokenizer.json file; or a directory holding a tokenizer. Never "
                            "downloaded.", reads=plain_paths, parse=tokenizer_spec)
    tokenizer_data: list[Path] = option(
        help="Records to train --tokenizer bpe:N on (repeatable; any --data format: text, "
        "prompt/completion or questions). Deterministic: the same files in the same order give "
        "a byte-identical tokenizer; undo.json records each file's fingerprint.",
        metavar="FILE", factory=list)
    seed: int = seed_option("Seed of the random initialisation.")

    def __post_init__(self) -> None:
        settle(self)
        if self.tokenizer_data and self.tokenizer.kind != "bpe":
            raise UsageError("--tokenizer-data is only used by --tokenizer bpe:N")
        if self.tokenizer.kind == "bpe" and not self.tokenizer_data:
            raise UsageError(BPE_NEEDS_DATA)


@dataclass(frozen=True)
class LanguageOptions(OptionGroup):
    """Options of the splitter (`undo data language`); impossible ones cannot be built
    (`UsageError`)."""

    retain_corpus: list[Path] = option(
        help="The retain language's text (repeatable): JSON Lines, JSON, CSV, Parquet or a "
        "saved datasets directory with a 'text' field (a document per record), or a plain-text "
        "file (a document per blank-line-separated paragraph). Default: the built-in English "
        "corpus.", metavar="FILE", factory=list)
    forget_corpus: list[Path] = option(
        help="The forget language's text (repeatable; as --retain-corpus). Default: the "
        "built-in Korean corpus.", metavar="FILE", factory=list)
    seed: int = seed_option("Seed of the document order: the same seed, options and corpora "
                            "give byte-identical files.")
    eval_fraction: float = option(0.1, "Share of each language's characters held out for "
                                  "evaluation, by whole documents (at least one document).",
                                  above=0.0)
    max_chars: int | None = option(None, "Keep at most about N characters of each language "
                                   "(whole documents, in the seed's order), e.g. to sample a "
                                   "large corpus. Default: everything.", minimum=1)

    def __post_init__(self) -> None:
        settle(self)
        if not self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must lie strictly between 0 and 1 (got "
                             f"{self.eval_fraction:g})")


@dataclass
class EvalRunOptions(OptionGroup):
    """What `undo eval` adds to the evaluation group: how much to score and with what."""

    batch_size: int | None = option(None, "Sequences per batch (default: adapts to length).",
                                    minimum=1)
    max_length: int | None = option(None, "Window in tokens (default: the model's maximum "
                                    "length, at most 4096); longer text is scored in "
                                    "consecutive windows.", minimum=2)
    limit: int | None = option(None, "Evaluate a seeded random sample of N records per set.",
                               minimum=1)
    seed: int = seed_option("Seed of the --limit sample.")
    target_delimiter: str | None = option(
        None, "Text between prompt and answer, or question and choice (lm-eval's "
        "target_delimiter). Default: none for prompt/answer records (their text is prompt + "
        "answer, as training reads it), ' ' for qa and letters, none for raw.", metavar="TEXT")
    log_samples: Path | None = option(
        None, "Write one JSON line per scored item to FILE (checkpoint, set, prompt, choices or "
        "target, log-likelihoods or generated text, correct or not), as lm-eval's "
        "--log_samples; lm-eval tasks' items as lm-eval records them.", metavar="FILE")
    lm_eval_tasks: str | None = option(
        None, "Comma-separated lm-evaluation-harness tasks (e.g. wmdp_bio,mmlu), or YAML files "
        "of tasks, run when lm_eval is installed; their scores are merged into the results "
        "(names checked before any model is loaded).", metavar="TASKS")
    lm_eval_include_path: list[Path] = option(
        help="A directory of lm-eval task YAML files (repeatable), so that --lm-eval-tasks "
        "finds your own tasks by name (lm-eval's --include_path); a task with a local data "
        "set (dataset_path: json, data_files) needs no network.", metavar="DIR", factory=list)
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: CUDA if any).")
    reference: Path | None = option(
        None, "A reference model (e.g. the teacher before unlearning) evaluated on the same "
        "sets: its metrics are shown and usable in --fail-if as teacher.SET.METRIC.",
        metavar="CKPT")

    @property
    def tasks(self) -> list[str]:
        """`wmdp_bio,mmlu` -> ["wmdp_bio", "mmlu"]."""
        return [t.strip() for t in (self.lm_eval_tasks or "").split(",") if t.strip()]


@dataclass
class ProbeOptions(OptionGroup):
    """`undo probe`: the split of the records and where the probes run."""

    out: Path | None = option(None, "Also write probe.json, probe.png and undo.json into DIR.",
                              metavar="DIR")
    seed: int = seed_option("Seed of the train/held-out split.")
    train_share: float = option(TRAIN_SHARE, "Share of the records the probes are fitted on; "
                                "they are scored on the rest.", above=0.0)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: CUDA if any).")

    def __post_init__(self) -> None:
        settle(self)
        if not self.train_share < 1.0:
            raise UsageError(f"--train-share must be below 1 (got {self.train_share:g})")


@dataclass
class ReportOptions(OptionGroup):
    """`undo report`: the roles of the labels, the retain metric and the bootstrap."""

    oracle: str = option("oracle", "Label of the data-filtering oracle (gold standard of "
                         "robustness).")
    unlearned: str = option("unlearned", "Label of the unlearned-only model (robustness 0).")
    base: str = option("base", "Label of the base model whose training compute the others "
                       "share (its chain is not counted as their compute).")
    retain_metric: str | None = option(None, "Retain metric of the table (default: the forget "
                                       "metric's kind on another set).", metavar="SET.METRIC")
    bootstrap_samples: int = option(BOOTSTRAP_SAMPLES, "Resamples of the 95% intervals (seeds, "
                                    "and items within seeds).", minimum=100,
                                    maximum=MAX_BOOTSTRAP_SAMPLES)
    seed: int = seed_option("Seed of the bootstrap (the same seed gives the same intervals).")
    max_retain_drop: float = option(0.1, "The attack matrix's utility limit: an evaluation "
                                    "whose retain metric is more than D worse than the model's "
                                    "own before the attack does not count (verdicts are shown "
                                    "with and without it).", metavar="D", minimum=0)
    fail_if: list[Condition] = option(help="Exit 3 (after writing) when EXPR holds, on any "
                                      "cell of the attack matrix: matrix.FAMILY.MODEL.worst, "
                                      ".difference, .collapsed, .verdict == \"recovered\" (or "
                                      "teaches, level, below oracle), .verdict_no_limit == "
                                      "...", metavar="EXPR", factory=list, repeatable=True,
                                      parse=conditions("--fail-if", rewrite_string_tests))


@dataclass
class PerturbRunOptions(OptionGroup):
    """What `undo perturb` adds to the noise step: its seed and the non-finite guard."""

    seed: int = seed_option("Noise seed; the same seed gives byte-identical weights.",
                            panel=NOISE)
    allow_nonfinite: bool = option(False, "Write NaN or infinite weights (copied from IN, or "
                                   "from noise that overflows a narrow dtype) instead of "
                                   "refusing them.", panel=NOISE)


@dataclass
class RootOptions(OptionGroup):
    """`undo`'s own options, given before the command: how the process runs it."""

    debug: bool = option(False, "Show full tracebacks instead of one-line errors.")
    threads: int | None = option(None, "CPU threads of the command (torch intra-op; default: "
                                 "torch's, i.e. the cores or OMP_NUM_THREADS). Give fewer when "
                                 "other work shares the cores.", metavar="N", minimum=1,
                                 maximum=4096)


__all__ = ["TRAIN_SHARE", "EvalRunOptions", "InitOptions", "LanguageOptions", "PerturbRunOptions",
           "ProbeOptions", "ReportOptions", "RootOptions", "seed_option"]
