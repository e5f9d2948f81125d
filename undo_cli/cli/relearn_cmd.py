"""`undo relearn-attack`: finetune copies of a model on forget data over a learning-rate grid
and report the worst case for the defender (see `undo_cli.relearn`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, err_console, info, is_main_rank, show_output
from undo_cli.cli.options import with_options
from undo_cli.console import ProgressDisplay
from undo_cli.errors import UsageError
from undo_cli.options import (
    AttackConfig,
    AttackMeasurement,
    DataOptions,
    EvalOptions,
    GateOptions,
    LoadOptions,
    OutputOptions,
    SaveOptions,
    TrainConfig,
)
from undo_cli.options.defaults import ATTACK_TRAIN
from undo_cli.options.inputs import AttackInputs

_LABELS = {"accuracy": "acc", "accuracy_norm": "acc_norm"}


class _AttackDisplay:
    """The attack's progress (`undo_cli.relearn.AttackProgress` callbacks) on one bar: run i
    of N, learning rate and seed, step; one line per finished run."""

    def __init__(self, enabled: bool):
        self.display = ProgressDisplay(enabled, transient=True)
        self.enabled = enabled
        self.total, self.steps, self.done, self.current = 0, 0, 0, ""

    def start(self, total_runs: int, steps: int) -> None:
        self.total, self.steps = total_runs, steps
        self.display.start(max(1, total_runs * max(1, steps)), "relearn-attack")

    def run_started(self, index: int, lr: float | None, seed: int | None,
                    config: str = "") -> None:
        what = config or ("original" if lr is None else f"lr {lr:g}")
        if seed is not None:
            what += f" seed {seed}"
        self.current = f"run {index}/{self.total}: {what}"
        if self.display.live:
            self.display.update(description=self.current, status="")

    def step(self, step: int) -> None:
        if self.display.live:
            self.display.update(self.done + step, status=f"step {step}")

    def run_finished(self, run: dict[str, Any], metric: str) -> None:
        if run.get("attack") == "finetune" and not run.get("quantize"):
            self.done += self.steps
        if run.get("static") or run.get("quantize"):
            name = run.get("config", "")
            self.current = f"{name}, quantised" if run.get("quantize") else name
        if self.display.live:
            self.display.update(self.done)
        last = run["curve"][-1] if run["curve"] else {}
        value = last.get(metric)
        shown = f"{metric} {value:.4g} at step {last['step']}" if value is not None else "no value"
        self.display.message(f"{self.current}: {shown}"
                             + (" (diverged)" if run.get("diverged") else ""))

    def message(self, text: str) -> None:
        self.display.message(text)

    def close(self) -> None:
        self.display.close()


def _progress(enabled: bool) -> _AttackDisplay:
    """An `_AttackDisplay` that is an `undo_cli.relearn.AttackProgress` (imported only when an
    attack runs: it imports torch)."""
    from undo_cli.relearn import AttackProgress

    class _Progress(_AttackDisplay, AttackProgress):
        pass

    return _Progress(enabled)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_results(results: dict[str, Any]) -> None:
    """A rich table on stderr: per configuration the forget metric at the end and at best,
    diverged runs and the other sets' metrics at the end; then the worst case."""
    from rich.table import Table

    from undo_cli.relearn import group_means

    metric = results["forget_metric"]
    runs = results["runs"]
    others = [k for k in results["initial"] if k != metric and
              k.rsplit(".", 1)[-1] in ("accuracy", "accuracy_norm", "loss")]
    table = Table(title=f"relearn-attack on {results['checkpoint']} "
                        f"({results['attack']['mode']}): {metric} by configuration",
                  title_justify="left")

    def header(name: str, suffix: str = "") -> str:
        head, _, key = name.rpartition(".")
        return f"{head}\n{_LABELS.get(key, key)}{suffix}"

    excluded = any(row.get("excluded_evaluations") for row in results["per_lr"])
    for name in ("configuration", "runs", "diverged", *(["excluded"] if excluded else []),
                 header(metric, " end"), header(metric, " best"), *[header(k) for k in others]):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    table.add_row("initial", "", "", *([""] if excluded else []),
                  _fmt(results["initial"].get(metric)), "",
                  *[_fmt(results["initial"].get(k)) for k in others])
    for row in results["per_lr"]:
        key = row.get("config") or ("original" if row["lr"] is None else f"lr{row['lr']:g}")
        name = key + (f" q{results['attack']['quantize']['bits']}" if row["quantized"] else "")
        ends = (group_means(runs, row["final_step"], (key, row["quantized"]))
                if row["final_step"] is not None else {})
        table.add_row(name, str(row["runs"]), str(row["diverged_runs"]),
                      *([str(row.get("excluded_evaluations", 0))] if excluded else []),
                      _fmt(row["final"]), _fmt(row["best"]), *[_fmt(ends.get(k)) for k in others])
    console = err_console
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        width = Measurement.get(console, console.options.update_width(400), table).maximum
        console = Console(stderr=True, highlight=False, width=max(console.width, width))
    console.print(table)
    s = results["summary"]
    lr = f" ({s['best_config']})" if s.get("best_config") else (
        f" (lr {s['best_lr']:g})" if isinstance(s.get("best_lr"), float) else "")
    band = (f" [95%: {_fmt(s['final_lower'], 3)}, {_fmt(s['final_upper'], 3)}]"
            if s.get("final_lower") is not None else "")
    auc_band = (f" [{_fmt(s['auc_lower'], 3)}, {_fmt(s['auc_upper'], 3)}]"
                if s.get("auc_lower") is not None else "")
    line = (f"worst case: {metric} {_fmt(s['initial'])} -> {_fmt(s['final'])}{band} at step "
            f"{s['final_step']}{lr}; mean over the attack (AUC) {_fmt(s['auc'])}{auc_band}")
    if s.get("threshold") is not None:
        if s["steps_to_threshold"] is None:
            line += f"; never reaches {s['threshold']:g}"
        else:
            kept = ", ".join(f"{k} {_fmt(v)}" for k, v in (s["retain_at_threshold"] or {}).items())
            line += (f"; reaches {s['threshold']:g} at step {s['steps_to_threshold']}"
                     + (f" ({kept})" if kept else ""))
    info(line)
    t = results["timing"]
    if t.get("eval_share") is not None:
        info(f"{len(runs)} runs in {t['wall_s']:.1f}s, {100 * t['eval_share']:.1f}% of it "
             f"evaluating ({t['evaluations']} evaluations)")


_HELP = (
    "Relearning attack: finetune copies of CKPT on forget-domain data at each learning rate "
    "of a grid and measure how fast the forgotten capability comes back (arXiv 2506.06278)."
    "\n\n"
    "Every run (learning rate x seed) starts from the same original weights, held in memory; "
    "the step-0 evaluation is shared. The worst case for the defender at each step is the "
    "best forget metric over learning rates (means over seeds first); a run that diverges "
    "stops counting from that step."
    "\n\n"
    "RESULTS_DIR gets results.json (settings, every run's curve, the worst case, summary "
    "numbers: final, AUC = mean of the worst-case curve, steps to --threshold), relearn.png "
    "(with matplotlib: pip install 'undo-cli\\[plot]') and undo.json."
    "\n\n"
    "--quantize 8|4 adds the quantisation attack (undo's round-to-nearest); --quantize "
    "nf4|int8 uses bitsandbytes and --quantize int4 optimum-quanto (pip install "
    "'undo-cli\\[quantize]'), --qlora adds LoRA finetuning on the quantised model. --prune, "
    "--benign-data and --embedding-attack add their attack families, each as runs of their "
    "own (docs/relearn-results.md, \"Attack families\"). --compare [LABEL=]DIR ... only draws "
    "the worst-case curves of earlier results into one figure (--out/compare.png)."
    "\n\n"
    "Data-parallel under `accelerate launch` (examples/accelerate/ddp.yaml) or torchrun: each "
    "run trains on every process (--batch-size each), the evaluations are split among them, "
    "only the main process writes. Not under FSDP."
)


@app.command("relearn-attack", help=_HELP)
@with_options("relearn-attack", inputs=AttackInputs, attack=AttackConfig, train=TrainConfig,
              data_options=DataOptions, evals=EvalOptions, measurement=AttackMeasurement,
              gates=GateOptions, load=LoadOptions, save=SaveOptions, output=OutputOptions,
              exclude=("lr", "optimizer", "max_steps", "max_tokens", "max_flops", "save_every",
                       "state_dir", "resume", "keep_last_finite", "log_every", "sam_rho",
                       "keep_best"))
def relearn_command(
    checkpoint: Path = typer.Argument(
        None, metavar="CKPT", help="The model to attack (not needed with --compare)."),
    *,
    inputs: AttackInputs,
    attack: AttackConfig,
    train: TrainConfig = ATTACK_TRAIN,
    data_options: DataOptions,
    evals: EvalOptions,
    measurement: AttackMeasurement,
    gates: GateOptions,
    load: LoadOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """`undo relearn-attack CKPT --data F --eval NAME=PATH --out DIR` (see the help text)."""
    out, data, compare = inputs.out, inputs.data, inputs.compare
    if compare:
        if checkpoint is not None or data or evals.eval:
            raise UsageError("--compare only plots earlier results: give no CKPT, --data or "
                             "--eval with it")
        from undo_cli.cli.app import refuse_launch

        refuse_launch("undo relearn-attack --compare")
        from undo_cli.relearn import compare_results

        summary = compare_results(compare, out, overwrite=output.overwrite,
                                  arguments={"compare": list(compare), "out": str(out)})
        if output.json:
            emit_json(summary)
        elif not output.quiet:
            info(f"wrote {out}/compare.png ({len(compare)} attacks)")
        return
    if checkpoint is None:
        raise UsageError("give the checkpoint to attack (CKPT), or --compare RESULTS_DIR ...")
    if not checkpoint.exists():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    from undo_cli.relearn import relearn_checkpoint

    attack = replace(attack, train=train)
    started = time.time()
    talk = show_output(output.quiet)  # one process reports under a launcher
    progress = _progress(enabled=talk)
    results = relearn_checkpoint(
        checkpoint, out, data=list(data), config=attack, evals=evals,
        data_options=data_options, measurement=measurement, gates=gates, load=load,
        overwrite=output.overwrite, raise_on_gate=False, progress=progress, save=save)
    if not is_main_rank():
        return
    if results.get("dry_run"):
        from undo_cli.cli.progress import show_plan

        return show_plan(results, output)
    if output.json:
        emit_json(results)
    if talk:
        render_results(results)
        info(f"wrote {out} in {time.time() - started:.1f}s")
    if results.get("gates"):
        from undo_cli.gates import raise_failed_gates

        raise_failed_gates(results["gates"])
