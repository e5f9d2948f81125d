"""What the training commands and `probe`/`report` read and write besides their positional
arguments: `--init`, `--data`, `--forget`/`--retain`, `--teacher`/`--student`, `--out`,
`--compare` (`undo_cli.options`). Each `--data` keeps its command's meaning (`PATH[:WEIGHT]`
for training data, `NAME=PATH` for `probe`), declared as a read (`paths.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from undo_cli.errors import UsageError
from undo_cli.options.base import ATTACK, METHOD, OptionGroup, named_path_option, option, settle
from undo_cli.options.paths import named_paths, plain_paths, weighted_paths
from undo_cli.options.text import NamedPath, tokenizer_spec


@dataclass
class TrainInputs(OptionGroup):
    """`undo train`: where the model comes from and what it trains on."""

    init: str = option(None, "A checkpoint directory to finetune, or a size preset (tiny, "
                       "small) to pretrain from scratch.", metavar="CKPT_OR_PRESET",
                       required=True, reads=plain_paths)
    data: list[str] = option(help="Training data, repeatable with mixing weights: .jsonl, "
                             ".json, .csv, .parquet or a saved datasets directory; {\"text\"} "
                             "records are packed into --max-length rows, {\"prompt\", "
                             "\"completion\"} records train on the completion only.",
                             metavar="PATH[:WEIGHT]", factory=list, required=True,
                             reads=weighted_paths)
    arch: str | None = option(None, "With a preset: llama (default), gemma2, gpt2 or qwen2.")
    tokenizer: str | None = option(None, "With a preset: 'char' (default), 'char:ALPHABET', a "
                                   "tokenizer.json file or a directory holding a tokenizer.",
                                   reads=plain_paths, parse=tokenizer_spec)

    def __post_init__(self) -> None:
        settle(self)
        if self.tokenizer is not None and self.tokenizer.kind == "bpe":
            raise UsageError(f"--tokenizer {self.tokenizer}: train a BPE tokenizer with `undo "
                             "init --tokenizer bpe:N --tokenizer-data FILE`, then give that "
                             "checkpoint as --init (or its directory as --tokenizer)")


@dataclass
class UnlearnInputs(OptionGroup):
    """`undo unlearn`: the method, the data to forget and the data to keep."""

    method: str = option(None, "Unlearning method (formulas above).", metavar="NAME",
                         panel=METHOD, required=True)  # the full help lists the methods
    forget: list[str] = option(help="Data to forget, repeatable with mixing weights "
                               "({\"text\"} records are packed into --max-length rows; "
                               "{\"prompt\", \"completion\"} records count the completion "
                               "only).", metavar="PATH[:WEIGHT]", panel=METHOD, factory=list,
                               required=True, reads=weighted_paths)
    retain: list[str] = option(help="Data to keep, repeatable (not used by ga; without it no "
                               "retain term).", metavar="PATH[:WEIGHT]", panel=METHOD,
                               factory=list, reads=weighted_paths)


@dataclass
class DistillInputs(OptionGroup):
    """`undo distill`: teacher, student and data."""

    teacher: Path = option(None, "The (unlearned) teacher checkpoint.", metavar="CKPT",
                           required=True)
    student: str = option("", "The student's initial weights: a checkpoint (normally `undo "
                          "perturb` of the teacher), `random` (fresh init with the teacher's "
                          "config: Unlearn-and-Distill), or `teacher` with --alpha/--beta "
                          "(noised in memory, identical to `undo perturb`).",
                          metavar="CKPT|random|teacher", reads=plain_paths)
    data: list[str] = option(help="Distillation data (retain / pretraining-like text), "
                             "repeatable with weights.", metavar="PATH[:WEIGHT]", factory=list,
                             required=True, reads=weighted_paths)


@dataclass
class AttackInputs(OptionGroup):
    """`undo relearn-attack`: the results directory, the attack data, or earlier results."""

    out: Path = option(None, "Results directory: results.json, relearn.png, undo.json.",
                       metavar="RESULTS_DIR", required=True)
    data: list[str] = option(help="Attack (forget-domain) training data, repeatable with "
                             "mixing weights. Without it, only the attacks without it run "
                             "(--quantize, --prune magnitude, --benign-data).",
                             metavar="PATH[:WEIGHT]", panel=ATTACK, factory=list,
                             reads=weighted_paths)
    compare: list[str] = option(help="Only plot: the worst-case curves of these attack results "
                                "(repeatable; e.g. base, unlearned, UNDO, oracle) into "
                                "--out/compare.png. No CKPT then.",
                                metavar="[LABEL=]RESULTS_DIR", factory=list, reads=named_paths)


@dataclass
class ProbeInputs(OptionGroup):
    """`undo probe`: the labelled sets probed."""

    data: list[NamedPath] = named_path_option(
        "--data", "Prompt/answer or multiple-choice records (repeatable); the label is the "
        "answer's first token or the correct choice.", required=True)


@dataclass
class ReportOutput(OptionGroup):
    """`undo report`: where the report goes."""

    out: Path = option(None, "Where report.md, report.json and the PNG figures go.",
                       metavar="REPORT_DIR", required=True)


__all__ = ["AttackInputs", "DistillInputs", "ProbeInputs", "ReportOutput", "TrainInputs",
           "UnlearnInputs"]
