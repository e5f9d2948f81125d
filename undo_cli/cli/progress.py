"""Progress of every command, drawn from the library's callbacks with one display
(`undo_cli.console.ProgressDisplay`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from undo_cli.console import ProgressDisplay, info
from undo_cli.options import OutputOptions
from undo_cli.stage import Callbacks
from undo_cli.stats import is_uncertainty

_SHOWN_AFTER = {"type", "step", "loss", "lr", "grad_norm", "tokens", "flops", "tokens_per_s",
                "elapsed_s"}


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


class TrainingProgress:
    """The engine's `on_step`/`on_log` drawn as one bar: steps (or tokens when the length is
    unknown), the loss and its terms, the learning rate and tokens/s; evaluations as lines."""

    def __init__(self, enabled: bool, description: str = "train"):
        self.display = ProgressDisplay(enabled)
        self.description = description

    def callbacks(self) -> Callbacks:
        return Callbacks(on_step=self.on_step, on_log=self.on_log)

    def on_step(self, step: int, total: int | None, tokens: int) -> None:
        if not self.display.live:
            self.display.start(total, self.description)
        self.display.update(step if total is not None else tokens)

    def on_log(self, entry: dict[str, Any]) -> None:
        kind = entry.get("type")
        if kind == "train":
            parts = [f"loss {entry['loss']:.4g}"]
            parts += [f"{k} {v:.4g}" for k, v in entry.items()
                      if k not in _SHOWN_AFTER and isinstance(v, float)]
            parts += [f"lr {entry['lr']:.2e}", f"{entry['tokens_per_s']:,.0f} tok/s"]
            status = " · ".join(parts)
            if self.display.live:
                self.display.update(status=status)
            else:
                self.display.message(f"step {entry['step']}: {status}")
        elif kind == "eval":
            shown = {k: v for k, v in entry.items()
                     if k not in ("type", "step", "tokens", "flops") and not is_uncertainty(k)}
            self.display.message(f"eval @ step {entry['step']}: {format_metrics(shown)}")

    def close(self) -> None:
        self.display.close()


def show_plan(summary: dict[str, Any], output: OutputOptions) -> None:
    """A --dry-run's memory plan: on stderr, and as JSON (`{"dry_run", "plan"}`) with --json."""
    from undo_cli.cli.common import emit_json

    lines = summary.pop("plan_lines")
    if output.json:
        emit_json(summary)
    else:
        for line in lines:
            info(line)


def run_stage(output: OutputOptions, description: str,
              run: Callable[[Callbacks], dict[str, Any]]) -> dict[str, Any] | None:
    """Run a training stage (`run(callbacks)`) under one progress bar. Returns its summary
    on the reporting process, after printing it as JSON with `--json`, and None elsewhere
    or when the summary was printed; a diverged run's warning is always shown."""
    from undo_cli.cli.common import emit_json, show_output

    progress = TrainingProgress(show_output(output.quiet), description)
    try:
        summary = run(progress.callbacks())
    finally:
        progress.close()
    if not summary.pop("is_main_process"):
        return None
    if summary.get("dry_run"):
        show_plan(summary, output)
        return None
    if summary.get("diverged"):
        info(f"warning: {summary['stop_reason']}; wrote the last finite weights")
    if output.json:
        emit_json(summary)
        return None
    return None if output.quiet else summary
