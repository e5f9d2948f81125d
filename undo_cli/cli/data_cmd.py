"""`undo data ...`: built-in synthetic data sets (`undo data arithmetic OUT_DIR`, `undo data
facts OUT_DIR`)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, info
from undo_cli.synthetic import ArithmeticOptions
from undo_cli.synthetic_mc import FactsOptions

data_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data",
              help="Write the settings' data sets (the paper's arithmetic task; its language "
              "setting on real text; a WMDP-shaped multiple-choice task).")

_DEFAULTS = ArithmeticOptions()
_FACTS = FactsOptions()


@data_app.command(
    "arithmetic", short_help="The arithmetic task: retain (+, -) and forget (*, /) data sets.")
def arithmetic_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    seed: int = typer.Option(
        _DEFAULTS.seed, help="Seed: the same seed and options give byte-identical files."),
    train_size: int = typer.Option(
        _DEFAULTS.train_size, help="Training records per split (retain, forget), shared "
        "equally by the split's two operations."),
    eval_size: int = typer.Option(
        _DEFAULTS.eval_size, help="Evaluation items per split, shared equally by its two "
        "operations; half of each operation's items (rounded up) are equations, the rest "
        "word problems from held-out templates."),
    add_max: int = typer.Option(
        _DEFAULTS.add_max, help="Addition and subtraction operands are 0..N (subtraction "
        "keeps a >= b)."),
    mul_max: int = typer.Option(
        _DEFAULTS.mul_max, help="Multiplication factors, divisors and quotients are 1..N "
        "(division is always exact)."),
    word_fraction: float = typer.Option(
        _DEFAULTS.word_fraction, help="Share of the training records that are word problems "
        "(the rest are bare equations)."),
    heldout_pairs: float = typer.Option(
        _DEFAULTS.heldout_pairs, help="Share (0 to 0.5) of each operation's operand pairs kept "
        "out of all training text; eval equations then use only those pairs. 0: eval "
        "equations test facts seen in training (a tiny model cannot infer unseen "
        "multiplication facts)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
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

    paths = generate_arithmetic(
        out, overwrite=overwrite, seed=seed, train_size=train_size, eval_size=eval_size,
        add_max=add_max, mul_max=mul_max, word_fraction=word_fraction,
        heldout_pairs=heldout_pairs,
    )
    summary = _summary(out, "arithmetic", seed, paths)
    counts = summary["records"]
    if json_out:
        emit_json(summary)
    else:
        info(f"wrote {out}: retain {counts['retain_train']} train / {counts['retain_eval']} "
             f"eval records, forget {counts['forget_train']} train / "
             f"{counts['forget_eval']} eval records")


@data_app.command(
    "facts", short_help="A WMDP-shaped task: hazard (forget) and general (retain) facts, "
    "four-choice questions and text corpora.")
def facts_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    seed: int = typer.Option(
        _FACTS.seed, help="Seed: the same seed and options give byte-identical files."),
    entities: int = typer.Option(
        _FACTS.entities, help="Made-up subjects per domain, four facts each (so 4 x N "
        "questions per domain)."),
    train_size: int = typer.Option(
        _FACTS.train_size, help="Corpus records per domain (every fact appears in every "
        "form)."),
    qa_fraction: float = typer.Option(
        _FACTS.qa_fraction, help="Share of corpus records that are 'Question: Q\\nAnswer: "
        "VALUE' lines."),
    mc_fraction: float = typer.Option(
        _FACTS.mc_fraction, help="Share of corpus records that are four-choice questions in "
        "the MMLU/WMDP layout with their letter answer (choice orders differ from the "
        "evaluation's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
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

    paths = generate_facts(out, overwrite=overwrite, seed=seed, entities=entities,
                           train_size=train_size, qa_fraction=qa_fraction,
                           mc_fraction=mc_fraction)
    summary = _summary(out, "facts", seed, paths)
    counts = summary["records"]
    if json_out:
        emit_json(summary)
    else:
        info(f"wrote {out}: forget (hazard) {counts['forget_corpus']} corpus records / "
             f"{counts['forget_mc']} questions, retain (general) {counts['retain_corpus']} "
             f"corpus records / {counts['retain_mc']} questions")


@data_app.command(
    "language", short_help="The paper's language setting on real text: retain English, "
    "forget Korean (built in, offline), or your own two corpora.")
def language_command(
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Output directory."),
    retain_corpus: list[Path] = typer.Option(
        None, "--retain-corpus", metavar="FILE",
        help="The retain language's text (repeatable): JSON Lines, JSON, CSV, Parquet or a "
        "saved datasets directory with a 'text' field (a document per record), or a "
        "plain-text file (a document per blank-line-separated paragraph). Default: the "
        "built-in English corpus."),
    forget_corpus: list[Path] = typer.Option(
        None, "--forget-corpus", metavar="FILE",
        help="The forget language's text (repeatable; as --retain-corpus). Default: the "
        "built-in Korean corpus."),
    seed: int = typer.Option(
        0, help="Seed of the document order: the same seed, options and corpora give "
        "byte-identical files."),
    eval_fraction: float = typer.Option(
        0.1, help="Share of each language's characters held out for evaluation, by whole "
        "documents (at least one document)."),
    max_chars: int = typer.Option(
        None, help="Keep at most about N characters of each language (whole documents, in "
        "the seed's order), e.g. to sample a large corpus. Default: everything."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
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
    from undo_cli.checkpoint import check_output_path
    from undo_cli.language import LanguageOptions, generate_language

    options = LanguageOptions(seed=seed, eval_fraction=eval_fraction, max_chars=max_chars,
                              retain_corpus=[str(p) for p in retain_corpus or []],
                              forget_corpus=[str(p) for p in forget_corpus or []])
    options.validate()
    reads = [("--retain-corpus", p) for p in retain_corpus or []]
    reads += [("--forget-corpus", p) for p in forget_corpus or []]
    check_output_path(out, overwrite=overwrite, reads=reads)
    paths = generate_language(out, overwrite=overwrite, **vars(options))
    summary = _summary(out, "language", seed, paths)
    counts = summary["records"]
    if json_out:
        emit_json(summary)
    else:
        info(f"wrote {out}: retain {counts['retain_train']} train / {counts['retain_eval']} "
             f"eval documents, forget {counts['forget_train']} train / "
             f"{counts['forget_eval']} eval documents")


def _summary(out: Path, task: str, seed: int, paths: dict[str, Path]) -> dict:
    """The `--json` summary of a generated task: its files and their record counts."""
    counts = {}
    for key, path in paths.items():
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                counts[key] = sum(1 for _ in f)
    return {"output": str(out), "task": task, "seed": seed,
            "files": {key: str(path) for key, path in paths.items()}, "records": counts}
