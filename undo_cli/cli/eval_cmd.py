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
from undo_cli.errors import UndoError, UsageError

# Short column labels of the table.
_LABELS = {"loss": "loss", "ppl": "ppl", "accuracy": "acc", "accuracy_norm": "acc_norm",
           "tokens": "tokens", "n": "n"}
_HIDDEN = ("tokens",)  # in --json only


def parse_data_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--data NAME=PATH` values -> [(NAME, PATH)], names unique."""
    from undo_cli.records import parse_named_spec

    pairs = [parse_named_spec(spec, "--data") for spec in specs]
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise UsageError(f"--data name {name!r} is used twice; give each set its own "
                             "NAME (--data NAME=PATH)")
        seen.add(name)
    return pairs


def parse_tasks(value: str | None) -> list[str]:
    """`wmdp_bio,mmlu` -> ["wmdp_bio", "mmlu"]."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


REFERENCE_PREFIXES = ("teacher", "reference")  # gate names of the --reference model's metrics


def check_gate_names(gates: list, sets: list, tasks: list[str], reference: bool) -> None:
    """`UsageError` (exit 2) for a gate name that no set gives, before any model is loaded.

    Known: `SET.METRIC` for each data set's shape, `teacher.` / `reference.` + those with a
    reference. lm-eval tasks' metrics are only known once they ran, so `TASK.*` names are
    checked then.
    """
    from undo_cli.evaluate import expected_metrics

    own = expected_metrics(sets)
    known = set(own)
    if reference:
        known |= {f"{prefix}.{name}" for prefix in REFERENCE_PREFIXES for name in own}
    for expr in gates:
        deferred = set()
        for name in expr.names():
            parts = name.split(".")
            if reference and len(parts) > 1 and parts[0] in REFERENCE_PREFIXES:
                parts = parts[1:]
            if parts[0] in tasks:
                deferred.add(name)
            elif name not in known and name.split(".")[0] in REFERENCE_PREFIXES \
                    and not reference:
                raise UsageError(f"--fail-if {expr.text!r} uses {name!r}: give --reference "
                                 "CKPT to compare with a reference model's metrics")
        expr.check_names(known | deferred)


def gate_values(metrics: dict[str, dict[str, Any]],
                reference: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The values a checkpoint's gates are evaluated on (module doc)."""
    from undo_cli.evaluate import flatten_metrics

    values = flatten_metrics(metrics)
    if reference is not None:
        for name, value in flatten_metrics(reference).items():
            for prefix in REFERENCE_PREFIXES:
                values[f"{prefix}.{name}"] = value
    return values


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _format(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def render_table(results: list[dict[str, Any]]) -> None:
    """A rich table on stderr: one row per checkpoint, one column per set and metric."""
    from rich.table import Table

    columns: list[tuple[str, str]] = []
    for result in results:
        for name, metrics in result["metrics"].items():
            for key in metrics:
                if key not in _HIDDEN and (name, key) not in columns:
                    columns.append((name, key))
    table = Table(show_lines=False)
    table.add_column("checkpoint", overflow="fold")
    for name, key in columns:
        table.add_column(f"{name}\n{_LABELS.get(key, key)}", justify="right")
    for result in results:
        cells = [result["checkpoint"]]
        for name, key in columns:
            value = result["metrics"].get(name, {}).get(key)
            cells.append("" if value is None else _format(key, value))
        table.add_row(*cells)
    console = err_console
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        width = Measurement.get(console, console.options.update_width(400), table).maximum
        console = Console(stderr=True, highlight=False, width=max(console.width, width))
    console.print(table)


@app.command("eval")
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
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1,
                                       help="Longest generated answer, in tokens."),
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
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Load pickled (.bin) weights."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run a checkpoint's own model code."),
    fail_if: list[str] = typer.Option(
        None, "--fail-if", metavar="EXPR",
        help="Exit with code 3 (after printing the results) if EXPR holds for any checkpoint, "
        "e.g. \"forget.accuracy > 0.05\" (repeatable). Names: SET.METRIC; with --reference "
        "also teacher.SET.METRIC (= reference.SET.METRIC), e.g. \"retain.accuracy < "
        "teacher.retain.accuracy - 0.03\". Numbers, + - * /, comparisons, and/or/not."),
    reference: Path = typer.Option(
        None, "--reference", metavar="CKPT",
        help="A reference model (e.g. the teacher before unlearning) evaluated on the same "
        "sets: its metrics are shown and usable in --fail-if as teacher.SET.METRIC."),
) -> None:
    """Evaluate checkpoints on data files: loss/perplexity, exact match, multiple choice."""
    from undo_cli.evaluate import (
        CHOICE_FORMATS,
        LM_EVAL_HINT,
        evaluate_checkpoints,
        lm_eval_available,
        read_eval_data,
    )
    from undo_cli.gates import check_gates, describe_gate, parse_gates, raise_failed_gates

    start = time.time()
    gates = parse_gates(fail_if or [])  # a malformed expression: exit 2 before anything else
    specs = parse_data_specs(data or [])
    tasks = parse_tasks(lm_eval_tasks)
    if not specs and not tasks:
        raise UsageError("nothing to evaluate: give --data NAME=PATH (or --lm-eval-tasks)")
    if choice_format not in CHOICE_FORMATS:
        raise UsageError(f"--choice-format {choice_format!r}: choose one of "
                         f"{', '.join(CHOICE_FORMATS)}")
    clash = sorted({name for name, _ in specs} & set(tasks))
    if clash:
        raise UsageError(f"--data name(s) {clash} clash with --lm-eval-tasks; rename the set")
    if tasks and not lm_eval_available():
        raise UsageError(LM_EVAL_HINT)
    if reference is not None:
        taken = sorted({name for name, _ in specs} & set(REFERENCE_PREFIXES))
        if taken:
            raise UsageError(f"--data name(s) {taken} are reserved for --reference metrics "
                             "in --fail-if; rename the set")
    # Read and validate every data file (and every gate's names) before any model is loaded.
    sets = [read_eval_data(name, path, limit=limit, seed=seed) for name, path in specs]
    check_gate_names(gates, sets, tasks, reference is not None)
    to_load = list(checkpoints)
    reference_index = None
    if reference is not None:
        reference_index = next((i for i, c in enumerate(checkpoints)
                                if _same_path(c, reference)), None)
        if reference_index is None:  # evaluated once, last
            to_load.append(reference)
            reference_index = len(to_load) - 1

    def on_start(ckpt: str) -> None:
        extra = " (reference)" if reference is not None and ckpt == str(reference) else ""
        info(f"evaluating {ckpt}{extra}")

    results = evaluate_checkpoints(
        to_load, sets, batch_size=batch_size, max_new_tokens=max_new_tokens,
        max_length=max_length, choice_format=choice_format, device=device,
        lm_eval_tasks=tasks, limit=limit, seed=seed, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, on_start=on_start,
    )
    payload: dict[str, Any] = {"results": results[:len(checkpoints)]}
    ref_metrics = None
    if reference_index is not None:
        ref_metrics = results[reference_index]["metrics"]
        payload["reference"] = {"checkpoint": str(reference), "metrics": ref_metrics}
    records: list[dict[str, Any]] = []
    problem: UndoError | None = None
    for result in payload["results"]:
        try:
            records += check_gates(gates, gate_values(result["metrics"], ref_metrics),
                                   checkpoint=result["checkpoint"])
        except UndoError as e:  # e.g. a NaN metric: show the results, then fail
            problem = type(e)(f"{e} for {result['checkpoint']}") \
                if type(e) in (UndoError, UsageError) else e
            records = []
            break
    if gates and problem is None:
        payload["gates"] = records
    if json_out:
        emit_json(payload)
    else:
        rows = list(payload["results"])
        if "reference" in payload and reference_index == len(checkpoints):
            rows.append({**payload["reference"],
                         "checkpoint": f"{reference} (reference)"})
        render_table(rows)
        info(f"done in {time.time() - start:.1f}s")
    if problem is not None:
        raise problem
    for record in records:
        if not record["failed"]:
            err_console.print(f"gate passed: {describe_gate(record)}", markup=False,
                              soft_wrap=True)  # one line per gate, for CI logs
    raise_failed_gates(records)
