"""`undo data ...`: built-in synthetic data sets (`undo data arithmetic OUT_DIR`, `undo data
facts OUT_DIR`)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.options import OutputOptions
from undo_cli.options.commands import LanguageOptions
from undo_cli.synthetic import ArithmeticOptions
from undo_cli.synthetic_mc import FactsOptions

data_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data",
              help="Write the settings' data sets (the paper's arithmetic task; its language "
              "setting on real text; a WMDP-shaped multiple-choice task).")


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
    _report(out, "arithmetic", task.seed, paths, output,
            "retain {retain_train} train / {retain_eval} eval records, forget {forget_train} "
            "train / {forget_eval} eval records")


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
    _report(out, "facts", task.seed, paths, output,
            "forget (hazard) {forget_corpus} corpus records / {forget_mc} questions, retain "
            "(general) {retain_corpus} corpus records / {retain_mc} questions")


@data_app.command(
    "language", short_help="The paper's language setting on real text: retain English, "
    "forget Korean (built in, offline), or your own two corpora.")
@with_options("data language", task=LanguageOptions, output=OutputOptions)
def language_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    *,
    task: LanguageOptions,
    output: OutputOptions,
) -> None:
    """Write the paper's language setting: retain = one language, forget = another, the
    forget metric the cross-entropy (loss) of held-out forget-language text.

    \b
    Files in OUT_DIR (JSON Lines, UTF-8, records {"text": ...}):
    - retain_train, retain_eval: the retain language's documents
    - forget_train, forget_eval: the forget language's documents
    - info.json (sources with fingerprints and licences, options, documents
      and characters per file), undo.json
    The eval sets are held out by document, never by chunk.

    Without corpora it writes the built-in setting, offline: English from Ambrose Bierce's
    The Devil's Dictionary (1911; 996 entries, 379 KB) and Korean from the Constitution of the
    Republic of Korea and ten National Assembly bills (147 documents, 92 KB), all public domain
    and shipped with undo. The paper used FineWeb-Edu (English) and FineWeb-2 kor_Hang
    (Korean): export a sample of each to JSON Lines with `datasets` where you have a network
    and pass them as --retain-corpus / --forget-corpus. examples/language.sh runs the setting
    end to end.
    """
    from undo_cli.language import generate_language

    show_output(output.quiet)
    paths = generate_language(out, task, overwrite=output.overwrite)
    _report(out, "language", task.seed, paths, output,
            "retain {retain_train} train / {retain_eval} eval documents, forget {forget_train} "
            "train / {forget_eval} eval documents")


def _report(out: Path, task: str, seed: int, paths: dict[str, Path], output: OutputOptions,
            counted: str) -> None:
    """The `--json` summary, or one line: `wrote OUT: ` + `counted` filled with the counts."""
    summary = _summary(out, task, seed, paths)
    if output.json:
        emit_json(summary)
    else:
        info(f"wrote {out}: " + counted.format(**summary["records"]))


def _summary(out: Path, task: str, seed: int, paths: dict[str, Path]) -> dict:
    """The `--json` summary of a generated task: its files and their record counts."""
    counts = {}
    for key, path in paths.items():
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                counts[key] = sum(1 for _ in f)
    return {"output": str(out), "task": task, "seed": seed,
            "files": {key: str(path) for key, path in paths.items()}, "records": counts}
