"""`undo data ...`: built-in synthetic data sets (`undo data arithmetic OUT_DIR`, `undo data
facts OUT_DIR`)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.options import OutputOptions
from undo_cli.synthetic import ArithmeticOptions
from undo_cli.synthetic_mc import FactsOptions

data_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data",
              help="Write built-in synthetic data sets (the paper's arithmetic task; a "
              "WMDP-shaped multiple-choice task).")


@data_app.command(
    "arithmetic", short_help="The arithmetic task: retain (+, -) and forget (*, /) data sets.")
@with_options("data arithmetic", task=ArithmeticOptions, output=OutputOptions)
def arithmetic_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    *,
    task: ArithmeticOptions,
    output: OutputOptions,
) -> None:
    """Write the arithmetic task: retain = addition, subtraction; forget = multiplication,
    division.

    \b
    Files in OUT_DIR (JSON Lines, ASCII):
    - retain_train, forget_train: {"text": "12 + 7 = 19"} or a word
      problem ending "... Answer: 19"
    - retain_eval, forget_eval: {"prompt": "12 + 7 = ", "answer": "19",
      "op": "add", "kind": "equation"} (kind "word" for word problems)
    - retain_eval_equation, retain_eval_word (and forget_...):
      the eval items of one kind
    - retain_eval_text, forget_eval_text: {"text": prompt + answer}
    - forget_attack_train, forget_attack_eval_equation (half A of the
      forget facts), forget_heldout_eval_equation (half B; no operand
      pair in both): attack with A, measure B (recovered vs relearned)
    - info.json (options, counts, held-out pairs, templates), undo.json

    Eval word problems come from templates never used in training. Tiny models learn the
    equations in minutes but not the unseen templates, so *_eval_equation gives the cleaner
    accuracy metric.
    """
    from undo_cli.synthetic import generate_arithmetic

    show_output(output.quiet)
    paths = generate_arithmetic(out, overwrite=output.overwrite, task=task)
    summary = _summary(out, "arithmetic", task.seed, paths)
    counts = summary["records"]
    if output.json:
        emit_json(summary)
    else:
        info(f"wrote {out}: retain {counts['retain_train']} train / {counts['retain_eval']} "
             f"eval records, forget {counts['forget_train']} train / "
             f"{counts['forget_eval']} eval records")


@data_app.command(
    "facts", short_help="A WMDP-shaped task: hazard (forget) and general (retain) facts, "
    "four-choice questions and text corpora.")
@with_options("data facts", task=FactsOptions, output=OutputOptions)
def facts_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    *,
    task: FactsOptions,
    output: OutputOptions,
) -> None:
    """Write a WMDP-shaped multiple-choice task: forget = a made-up "hazard" domain, retain =
    a made-up "general" domain.

    \b
    Files in OUT_DIR (JSON Lines, ASCII), per split (forget, retain):
    - SPLIT_corpus: {"text": ...} statements, question-answer lines and
      four-choice questions with their letter (unlearning, distillation, attack)
    - SPLIT_mc: {"question", "choices": [4], "answer": index} per fact, the
      WMDP/MMLU layout: undo eval --data forget=DIR/forget_mc.jsonl
      (--choice-format letters or qa)
    - SPLIT_eval_text: one statement per fact (loss metric)
    - info.json (options, the facts, templates), undo.json

    examples/wmdp_shaped.sh runs the paper's WMDP recipe on it end to end.
    """
    from undo_cli.synthetic_mc import generate_facts

    show_output(output.quiet)
    paths = generate_facts(out, overwrite=output.overwrite, task=task)
    summary = _summary(out, "facts", task.seed, paths)
    counts = summary["records"]
    if output.json:
        emit_json(summary)
    else:
        info(f"wrote {out}: forget (hazard) {counts['forget_corpus']} corpus records / "
             f"{counts['forget_mc']} questions, retain (general) {counts['retain_corpus']} "
             f"corpus records / {counts['retain_mc']} questions")


def _summary(out: Path, task: str, seed: int, paths: dict[str, Path]) -> dict:
    """The `--json` summary of a generated task: its files and their record counts."""
    counts = {}
    for key, path in paths.items():
        if path.suffix == ".jsonl":
            with open(path, encoding="ascii") as f:
                counts[key] = sum(1 for _ in f)
    return {"output": str(out), "task": task, "seed": seed,
            "files": {key: str(path) for key, path in paths.items()}, "records": counts}
