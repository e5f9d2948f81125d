"""`undo eval`: metrics of one or more checkpoints on data files (see `undo_cli.evaluate`),
and `--fail-if` gates on them (see `undo_cli.gates`).

Gate names: `SET.METRIC` (the checkpoint's own metrics) and, with `--reference CKPT`,
`teacher.SET.METRIC` / `reference.SET.METRIC` (the same metric of the reference model, which
is evaluated on the same sets). Every checkpoint must pass every gate.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, err_console, info
from undo_cli.cli.options import with_options
from undo_cli.errors import UsageError
from undo_cli.jsontext import is_finite_number
from undo_cli.options import EvalOptions, GateOptions, LoadOptions, check_number, check_seed
from undo_cli.records import parse_named_specs
from undo_cli.stats import is_uncertainty

# Short column labels of the table.
_LABELS = {"loss": "loss", "ppl": "ppl", "accuracy": "acc", "accuracy_norm": "acc_norm",
           "tokens": "tokens", "n": "n"}
_HIDDEN = ("tokens",)  # in --json only


def parse_tasks(value: str | None) -> list[str]:
    """`wmdp_bio,mmlu` -> ["wmdp_bio", "mmlu"]."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def _format(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def cell(key: str, metrics: dict[str, Any]) -> str:
    """A metric with its uncertainty: an accuracy with its 95% Wilson interval
    (`0.860 [0.78, 0.92]`), a loss with its standard error (`1.234 ±0.05`)."""
    value = metrics.get(key)
    if value is None:
        return ""
    text = _format(key, value)
    lower, upper = metrics.get(f"{key}_lower"), metrics.get(f"{key}_upper")
    stderr = metrics.get(f"{key}_stderr")
    if is_finite_number(lower) and is_finite_number(upper):
        return f"{text} [{lower:.2f}, {upper:.2f}]"
    if is_finite_number(stderr):
        return f"{text} ±{stderr:.2g}"
    return text


def render_table(results: list[dict[str, Any]]) -> None:
    """A rich table on stderr: one row per checkpoint, one column per set and metric, each
    cell with its uncertainty (`cell`)."""
    from rich.table import Table

    columns: list[tuple[str, str]] = []
    for result in results:
        for name, metrics in result["metrics"].items():
            for key in metrics:
                if (key not in _HIDDEN and not is_uncertainty(key)
                        and (name, key) not in columns):
                    columns.append((name, key))
    table = Table(show_lines=False)
    table.add_column("checkpoint", overflow="fold")
    for name, key in columns:
        table.add_column(f"{name}\n{_LABELS.get(key, key)}", justify="right")
    for result in results:
        cells = [result["checkpoint"]]
        for name, key in columns:
            cells.append(cell(key, result["metrics"].get(name, {})))
        table.add_row(*cells)
    console = err_console
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        width = Measurement.get(console, console.options.update_width(400), table).maximum
        console = Console(stderr=True, highlight=False, width=max(console.width, width))
    console.print(table)


@app.command("eval")
@with_options("eval", load=LoadOptions, gates=GateOptions)
def eval_command(
    checkpoints: list[Path] = typer.Argument(..., metavar="CKPT...",
                                             help="Checkpoint directories to evaluate."),
    data: list[str] = typer.Option(
        None, "--data", metavar="NAME=PATH",
        help="A data set to evaluate on (repeatable). The record shape decides the metrics: "
        "text -> loss, ppl; prompt + completion/answer -> loss, greedy exact-match accuracy; "
        "question + choices + answer -> multiple-choice accuracy, accuracy_norm. PATH may "
        "also name a built-in set such as arithmetic:retain_eval."),
    json_out: bool = typer.Option(False, "--json",
                                  help="Print one JSON object on stdout and nothing else."),
    batch_size: int = typer.Option(None, "--batch-size", min=1,
                                   help="Sequences per batch (default: adapts to length)."),
    max_new_tokens: int = typer.Option(EvalOptions().max_new_tokens, "--max-new-tokens", min=1,
                                       help="Greedy tokens generated per prompt when "
                                       "measuring accuracy."),
    max_length: int = typer.Option(
        None, "--max-length", min=2,
        help="Window in tokens (default: the model's maximum length, at most 4096); longer "
        "text is scored in consecutive windows."),
    limit: int = typer.Option(None, "--limit", min=1,
                              help="Evaluate a seeded random sample of N records per set."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    choice_format: str = typer.Option(
        "qa", "--choice-format",
        help="Multiple-choice prompt: qa ('Question: Q\\nAnswer:' + ' CHOICE'), letters "
        "(MMLU/WMDP style: lettered choices, scores ' A', ' B', ...) or raw."),
    lm_eval_tasks: str = typer.Option(
        None, "--lm-eval-tasks", metavar="TASKS",
        help="Comma-separated lm-evaluation-harness tasks (e.g. wmdp_bio,mmlu), run when "
        "lm_eval is installed; their scores are merged into the results."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: CUDA if any)."),
    reference: Path = typer.Option(
        None, "--reference", metavar="CKPT",
        help="A reference model (e.g. the teacher before unlearning) evaluated on the same "
        "sets: its metrics are shown and usable in --fail-if as teacher.SET.METRIC."),
    *,
    load: LoadOptions,
    gates: GateOptions,
) -> None:
    """Evaluate checkpoints on data files: loss/perplexity, exact match, multiple choice."""
    from undo_cli.evaluate import CHOICE_FORMATS, LM_EVAL_HINT
    from undo_cli.evaluation import evaluate_and_gate, lm_eval_available
    from undo_cli.gates import describe_gate, parse_gates, raise_failed_gates
    from undo_cli.records import read_eval_data

    start = time.time()
    for flag, value, low in (("--batch-size", batch_size, 1), ("--limit", limit, 1),
                             ("--max-new-tokens", max_new_tokens, 1),
                             ("--max-length", max_length, 2)):
        check_number(flag, value, minimum=low)
    check_seed("--seed", seed)
    parse_gates(gates.fail_if)  # malformed: exit 2 before anything else
    specs = parse_named_specs(data or [], "--data")
    tasks = parse_tasks(lm_eval_tasks)
    if not specs and not tasks:
        raise UsageError("nothing to evaluate: give --data NAME=PATH (or --lm-eval-tasks)")
    if choice_format not in CHOICE_FORMATS:
        raise UsageError(f"--choice-format {choice_format!r}: choose one of "
                         f"{', '.join(CHOICE_FORMATS)}")
    if tasks and not lm_eval_available():
        raise UsageError(LM_EVAL_HINT)
    # Read and validate every data file (and every gate's names) before any model is loaded.
    sets = [read_eval_data(name, path, limit=limit, seed=seed) for name, path in specs]

    def on_start(ckpt: str) -> None:
        extra = " (reference)" if reference is not None and ckpt == str(reference) else ""
        info(f"evaluating {ckpt}{extra}")

    payload = evaluate_and_gate(
        checkpoints, sets, reference=reference, fail_if=gates.fail_if, tasks=tasks,
        on_start=on_start, batch_size=batch_size, max_new_tokens=max_new_tokens,
        max_length=max_length, choice_format=choice_format, device=device, limit=limit,
        seed=seed, allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code)
    problem = payload.pop("error", None)
    listed = payload.get("reference", {}).pop("listed", True)
    if json_out:
        emit_json(payload)
    else:
        rows = list(payload["results"])
        if "reference" in payload and not listed:
            rows.append({**payload["reference"], "checkpoint": f"{reference} (reference)"})
        render_table(rows)
        info(f"done in {time.time() - start:.1f}s")
    if problem is not None:
        raise problem
    records = payload.get("gates", [])
    for record in records:
        if not record["failed"]:
            err_console.print(f"gate passed: {describe_gate(record)}", markup=False,
                              soft_wrap=True)  # one line per gate, for CI logs
    raise_failed_gates(records)
