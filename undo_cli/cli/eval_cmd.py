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
from undo_cli.options.paths import named_paths
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


def _samples_file(path: Path | None, checkpoints: list[Path]) -> Path | None:
    """--log-samples FILE, checked before any work: not a directory, not inside a checkpoint
    evaluated, its directory existing."""
    if path is None:
        return None
    if path.is_dir():
        raise UsageError(f"--log-samples {path} is a directory; give a file name (JSON Lines)")
    if not path.parent.is_dir():
        raise UsageError(f"--log-samples {path}: the directory {path.parent} does not exist")
    for ckpt in checkpoints:
        try:
            path.resolve().relative_to(Path(ckpt).resolve())
        except ValueError:
            continue
        raise UsageError(f"--log-samples {path} lies inside the checkpoint {ckpt}, which undo "
                         "must not change: write it elsewhere")
    return path


def _write_samples(path: Path, records: list[dict[str, Any]]) -> None:
    """The records as JSON Lines, written aside and renamed into place."""
    import os

    from undo_cli.jsontext import to_json

    tmp = path.with_name(f".{path.name}.undo-tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(to_json(record) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info(f"wrote {len(records):,} samples to {path}")


@app.command("eval")
@with_options("eval", outputs=("log_samples",), reads={"data": named_paths}, load=LoadOptions,
              gates=GateOptions)
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
        help="Multiple-choice prompt, each exactly lm-evaluation-harness's: qa ('Question: "
        "Q\\nAnswer:' + ' CHOICE', its ARC layout), letters (its MMLU/WMDP layout: lettered "
        "choices, scores ' A', ' B', ...) or raw (question and choice as given)."),
    target_delimiter: str = typer.Option(
        None, "--target-delimiter", metavar="TEXT",
        help="Text between prompt and answer, or question and choice (lm-eval's "
        "target_delimiter). Default: none for prompt/answer records (their text is prompt + "
        "answer, as training reads it), ' ' for qa and letters, none for raw."),
    until: list[str] = typer.Option(
        [], "--until", metavar="TEXT",
        help="Stop strings of greedy generation (repeatable; lm-eval's until): the answer is "
        "cut at the first one. Default: a newline. \\n and \\t are read as newline and tab. "
        "EOS always stops. A prompt ending in whitespace is generated from without it (the "
        "tokens training reads); lm-eval's generate_until keeps it, which on a BPE model "
        "can cost all accuracy (docs/benchmarks.md)."),
    log_samples: Path = typer.Option(
        None, "--log-samples", metavar="FILE",
        help="Write one JSON line per scored item to FILE (checkpoint, set, prompt, choices or "
        "target, log-likelihoods or generated text, correct or not), as lm-eval's "
        "--log_samples; lm-eval tasks' items as lm-eval records them."),
    lm_eval_tasks: str = typer.Option(
        None, "--lm-eval-tasks", metavar="TASKS",
        help="Comma-separated lm-evaluation-harness tasks (e.g. wmdp_bio,mmlu), or YAML files "
        "of tasks, run when lm_eval is installed; their scores are merged into the results "
        "(names checked before any model is loaded)."),
    lm_eval_include_path: list[Path] = typer.Option(
        [], "--lm-eval-include-path", metavar="DIR",
        help="A directory of lm-eval task YAML files (repeatable), so that --lm-eval-tasks "
        "finds your own tasks by name (lm-eval's --include_path); a task with a local data "
        "set (dataset_path: json, data_files) needs no network."),
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
    from undo_cli.cli import debug_enabled
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
    if lm_eval_include_path and not tasks:
        raise UsageError("--lm-eval-include-path needs --lm-eval-tasks")
    samples_file = _samples_file(log_samples, [*checkpoints, *([reference] if reference else [])])
    # Read and validate every data file (and every gate's names) before any model is loaded.
    sets = [read_eval_data(name, path, limit=limit, seed=seed) for name, path in specs]

    def on_start(ckpt: str) -> None:
        extra = " (reference)" if reference is not None and ckpt == str(reference) else ""
        info(f"evaluating {ckpt}{extra}")

    logged: list[dict[str, Any]] = []

    def on_samples(ckpt: str, name: str, records: list) -> None:
        logged.extend({"checkpoint": ckpt, "set": name, **r} for r in records)

    payload = evaluate_and_gate(
        checkpoints, sets, reference=reference, fail_if=gates.fail_if, tasks=tasks,
        include_path=lm_eval_include_path, on_start=on_start, batch_size=batch_size,
        max_new_tokens=max_new_tokens, max_length=max_length, choice_format=choice_format,
        device=device, limit=limit, seed=seed, allow_pickle=load.allow_pickle,
        trust_remote_code=load.trust_remote_code, base_model=load.base_model,
        until=until or None, target_delimiter=target_delimiter,
        on_samples=on_samples if samples_file is not None else None,
        quiet_lm_eval=not debug_enabled())
    if samples_file is not None:
        _write_samples(samples_file, logged)
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
