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

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, err_console, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.errors import UsageError
from undo_cli.jsontext import is_finite_number
from undo_cli.options import EvalOptions, GateOptions, LoadOptions, OutputOptions
from undo_cli.options.commands import EvalRunOptions
from undo_cli.stats import is_uncertainty

# Short column labels of the table.
_LABELS = {"loss": "loss", "ppl": "ppl", "accuracy": "acc", "accuracy_norm": "acc_norm",
           "tokens": "tokens", "n": "n"}
_HIDDEN = ("tokens",)  # in --json only


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


def _samples_file(path: Path | None, checkpoints: list[Path],
                  data: list[tuple[str, str]]) -> Path | None:
    """--log-samples FILE, checked before any work: not a directory, not a `--data` set nor
    inside one (it would replace the set it scores), not inside a checkpoint evaluated, its
    directory existing."""
    if path is None:
        return None
    if path.is_dir():
        raise UsageError(f"--log-samples {path} is a directory; give a file name (JSON Lines)")
    if not path.parent.is_dir():
        raise UsageError(f"--log-samples {path}: the directory {path.parent} does not exist")
    for name, source in data:
        if not Path(source).exists():
            continue  # a built-in set (arithmetic:...) or a missing file, refused when read
        same = path.exists() and path.samefile(source)
        if same or path.resolve().is_relative_to(Path(source).resolve()):
            raise UsageError(f"--log-samples {path} would overwrite the data it scores "
                             f"(--data {name}={source}): write it elsewhere")
    for ckpt in checkpoints:
        try:
            path.resolve().relative_to(Path(ckpt).resolve())
        except ValueError:
            continue
        raise UsageError(f"--log-samples {path} lies inside the checkpoint {ckpt}, which undo "
                         "must not change: write it elsewhere")
    return path


@app.command("eval")
@with_options("eval", outputs=("log_samples",), aliases={"eval": ("--data",)},
              evals=EvalOptions, run=EvalRunOptions, load=LoadOptions, gates=GateOptions,
              output=OutputOptions, exclude=("eval_batch_size", "overwrite"))
def eval_command(
    checkpoints: list[Path] = typer.Argument(..., metavar="CKPT...",
                                             help="Checkpoint directories to evaluate."),
    *,
    evals: EvalOptions,
    run: EvalRunOptions,
    load: LoadOptions,
    gates: GateOptions,
    output: OutputOptions,
) -> None:
    """Evaluate checkpoints on data files: loss/perplexity, exact match, multiple choice."""
    from undo_cli.cli.app import debug_enabled
    from undo_cli.evaluate import LM_EVAL_HINT
    from undo_cli.evaluation import evaluate_and_gate, lm_eval_available, write_samples
    from undo_cli.gates import describe_gate, raise_failed_gates
    from undo_cli.records import read_eval_data

    start = time.time()
    talk = show_output(output.quiet)  # --quiet: errors only (and --json's document)
    specs = evals.sets
    tasks = run.tasks
    if not specs and not tasks:
        raise UsageError("nothing to evaluate: give --eval NAME=PATH (or --data NAME=PATH, "
                         "or --lm-eval-tasks)")
    if tasks and not lm_eval_available():
        raise UsageError(LM_EVAL_HINT)
    if run.lm_eval_include_path and not tasks:
        raise UsageError("--lm-eval-include-path needs --lm-eval-tasks")
    reference = run.reference
    samples_file = _samples_file(run.log_samples,
                                 [*checkpoints, *([reference] if reference else [])], specs)
    # Read and validate every data file (and every gate's names) before any model is loaded.
    sets = [read_eval_data(name, path, limit=run.limit, seed=run.seed) for name, path in specs]

    def on_start(ckpt: str) -> None:
        extra = " (reference)" if reference is not None and ckpt == str(reference) else ""
        if talk:
            info(f"evaluating {ckpt}{extra}")

    logged: list[dict[str, Any]] = []

    def on_samples(ckpt: str, name: str, records: list) -> None:
        logged.extend({"checkpoint": ckpt, "set": name, **r} for r in records)

    payload = evaluate_and_gate(
        checkpoints, sets, reference=reference, fail_if=gates.fail_if, tasks=tasks,
        include_path=run.lm_eval_include_path, on_start=on_start, batch_size=run.batch_size,
        max_new_tokens=evals.max_new_tokens, max_length=run.max_length,
        choice_format=evals.choice_format, device=run.device, limit=run.limit, seed=run.seed,
        allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code,
        base_model=load.base_model, until=evals.until or None,
        target_delimiter=run.target_delimiter,
        on_samples=on_samples if samples_file is not None else None,
        quiet_lm_eval=not debug_enabled())
    if samples_file is not None:
        write_samples(samples_file, logged)
        if talk:
            info(f"wrote {len(logged):,} samples to {samples_file}")
    problem = payload.pop("error", None)
    listed = payload.get("reference", {}).pop("listed", True)
    if output.json:
        emit_json(payload)
    elif talk:
        rows = list(payload["results"])
        if "reference" in payload and not listed:
            rows.append({**payload["reference"], "checkpoint": f"{reference} (reference)"})
        render_table(rows)
        info(f"done in {time.time() - start:.1f}s")
    if problem is not None:
        raise problem
    records = payload.get("gates", [])
    for record in records if talk else []:
        if not record["failed"]:
            err_console.print(f"gate passed: {describe_gate(record)}", markup=False,
                              soft_wrap=True)  # one line per gate, for CI logs
    raise_failed_gates(records)
