"""`undo relearn-attack`: finetune copies of a model on forget data over a learning-rate grid
and report the worst case for the defender (see `undo_cli.relearn`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from undo_cli import relearn_defaults as defaults
from undo_cli.cli import app
from undo_cli.cli.common import TrainingOptions, emit_json, err_console, info, training_options
from undo_cli.errors import UsageError

_ATTACK = "Attack"
_LABELS = {"accuracy": "acc", "accuracy_norm": "acc_norm"}
_MEASURE = "Measurement"


class _ProgressLine:
    """One overall progress line on stderr (run i/N, lr, step); plain lines off a terminal.

    It implements the callbacks of `undo_cli.relearn.AttackProgress`, which `_progress` adds
    as a base class when an attack starts: importing `undo_cli.relearn` at the top of this
    module would import torch for every command, even `undo --help`.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None
        self.steps = 0
        self.done = 0

    def start(self, total_runs: int, steps: int) -> None:
        self.total, self.steps = total_runs, steps
        if not self.enabled or not err_console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                            MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                            transient=True)
        self.bar.start()
        self.task = self.bar.add_task("relearn-attack", total=max(1, total_runs * max(1, steps)),
                                      status="")

    def run_started(self, index: int, lr: float | None, seed: int | None,
                    quantize: bool = False) -> None:
        what = "original" if lr is None else f"lr {lr:g} seed {seed}"
        if quantize:
            what += ", quantised"
        self.current = f"run {index}/{self.total}: {what}"
        if self.bar is not None:
            self.bar.update(self.task, description=self.current, status="")

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done + step, status=f"step {step}")

    def run_finished(self, run: dict[str, Any], metric: str) -> None:
        if not run.get("quantize"):
            self.done += self.steps
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        if not self.enabled:
            return
        last = run["curve"][-1] if run["curve"] else {}
        value = last.get(metric)
        shown = f"{metric} {value:.4g} at step {last['step']}" if value is not None else "no value"
        line = f"{self.current}: {shown}" + (" (diverged)" if run.get("diverged") else "")
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            info(line)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.console.print(text, markup=False) if self.bar is not None else info(text))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _progress(enabled: bool) -> _ProgressLine:
    """A `_ProgressLine` that is an `undo_cli.relearn.AttackProgress`."""
    from undo_cli.relearn import AttackProgress

    class _Progress(_ProgressLine, AttackProgress):
        pass

    return _Progress(enabled)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_results(results: dict[str, Any]) -> None:
    """A rich table on stderr: per learning rate the forget metric at the end and at best,
    diverged runs and the other sets' metrics at the end; then the worst case."""
    from rich.table import Table

    from undo_cli.relearn import group_means

    metric = results["forget_metric"]
    runs = results["runs"]
    others = [k for k in results["initial"] if k != metric and
              k.rsplit(".", 1)[-1] in ("accuracy", "accuracy_norm", "loss")]
    table = Table(title=f"relearn-attack on {results['checkpoint']} "
                        f"({results['attack']['mode']}): {metric} by learning rate",
                  title_justify="left")

    def header(name: str, suffix: str = "") -> str:
        head, _, key = name.rpartition(".")
        return f"{head}\n{_LABELS.get(key, key)}{suffix}"

    for name in ("lr", "runs", "diverged", header(metric, " end"), header(metric, " best"),
                 *[header(k) for k in others]):
        table.add_column(name, justify="right")
    table.add_row("initial", "", "", _fmt(results["initial"].get(metric)), "",
                  *[_fmt(results["initial"].get(k)) for k in others])
    for row in results["per_lr"]:
        lr = "original" if row["lr"] is None else f"{row['lr']:g}"
        if row["quantized"]:
            lr += f" q{results['attack']['quantize']['bits']}"
        ends = (group_means(runs, row["final_step"], (row["lr"], row["quantized"]))
                if row["final_step"] is not None else {})
        table.add_row(lr, str(row["runs"]), str(row["diverged_runs"]), _fmt(row["final"]),
                      _fmt(row["best"]), *[_fmt(ends.get(k)) for k in others])
    console = err_console
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        width = Measurement.get(console, console.options.update_width(400), table).maximum
        console = Console(stderr=True, highlight=False, width=max(console.width, width))
    console.print(table)
    s = results["summary"]
    lr = f" (lr {s['best_lr']:g})" if isinstance(s.get("best_lr"), float) else ""
    line = (f"worst case: {metric} {_fmt(s['initial'])} -> {_fmt(s['final'])} at step "
            f"{s['final_step']}{lr}; mean over the attack (AUC) {_fmt(s['auc'])}")
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


def _parse_seeds(seeds: int) -> None:
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1 (got {seeds})")


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
    "--quantize 8|4 adds the quantisation attack; --compare [LABEL=]DIR ... only draws the "
    "worst-case curves of earlier results into one figure (--out/compare.png)."
    "\n\n"
    "Data-parallel under `accelerate launch` (examples/accelerate/ddp.yaml) or torchrun: each "
    "run trains on every process (--batch-size each), the evaluations are split among them, "
    "only the main process writes. Not under FSDP."
)


@app.command("relearn-attack", help=_HELP)
@training_options(
    defaults={"schedule": "constant", "eval_every": defaults.DEFAULT_EVAL_EVERY},
    exclude=("lr", "max_steps", "max_tokens", "save_every", "state_dir", "resume",
             "keep_last_finite", "log_every"),
    help={"eval_every": "Evaluate every N steps (and at step 0 and the last step).",
          "seed": "First seed: runs use seeds SEED .. SEED+N-1 (--seeds N) for data order.",
          "batch_size": "Examples per attack step and per process (N processes under a "
                        "launcher train on N times this).",
          "schedule": "Learning-rate schedule of each run: constant (default), linear or "
                      "cosine.",
          "json": "Print results.json on stdout."},
)
def relearn_command(
    checkpoint: Path = typer.Argument(
        None, metavar="CKPT", help="The model to attack (not needed with --compare)."),
    out: Path = typer.Option(..., "--out", metavar="RESULTS_DIR",
                             help="Results directory: results.json, relearn.png, undo.json."),
    data: list[str] = typer.Option(
        [], "--data", metavar="PATH[:WEIGHT]", rich_help_panel=_ATTACK,
        help="Attack (forget-domain) training data, repeatable with mixing weights. Without "
        "it, only --quantize is applied."),
    eval_sets: list[str] = typer.Option(
        [], "--eval", metavar="NAME=PATH", rich_help_panel=_MEASURE,
        help="Eval sets measured at step 0, every --eval-every steps and at the end "
        "(metrics NAME.loss, NAME.accuracy, ...; repeatable)."),
    forget_metric: str = typer.Option(
        None, "--forget-metric", metavar="NAME.METRIC", rich_help_panel=_MEASURE,
        help="What the attacker recovers: NAME.accuracy / NAME.accuracy_norm (maximised) or "
        "NAME.loss / NAME.ppl (minimised). Default: forget.accuracy, else forget.loss."),
    lrs: str = typer.Option(
        None, "--lrs", metavar="LR,LR,...", rich_help_panel=_ATTACK,
        help="Learning rates of the grid. Default: the paper's ten log-spaced values "
        f"{defaults.PAPER_LRS[0]:g} ... {defaults.PAPER_LRS[-1]:g}."),
    steps: int = typer.Option(defaults.DEFAULT_STEPS, "--steps", rich_help_panel=_ATTACK,
                              help="Optimizer steps of every run."),
    seeds: int = typer.Option(1, "--seeds", metavar="N", rich_help_panel=_ATTACK,
                              help="Seeds per learning rate (averaged before the worst case)."),
    threshold: float = typer.Option(
        None, "--threshold", rich_help_panel=_MEASURE,
        help="Report the first step at which the worst case reaches this value (and the "
        "retain metrics there)."),
    lora: bool = typer.Option(False, "--lora", rich_help_panel=_ATTACK,
                              help="Attack with a LoRA adapter instead of full finetuning."),
    lora_rank: int = typer.Option(
        defaults.DEFAULT_LORA_RANK, "--lora-rank", rich_help_panel=_ATTACK,
        help="LoRA rank (clipped to the narrowest wrapped layer of a tiny model)."),
    lora_alpha: float = typer.Option(defaults.DEFAULT_LORA_ALPHA, "--lora-alpha",
                                     rich_help_panel=_ATTACK, help="LoRA alpha."),
    lora_targets: str = typer.Option(
        defaults.DEFAULT_LORA_TARGETS, "--lora-targets", metavar="all-linear|NAME,NAME",
        rich_help_panel=_ATTACK,
        help="Layers LoRA wraps: all-linear (every attention and MLP projection, not the "
        "output head) or module names such as q_proj,v_proj."),
    quantize: int = typer.Option(
        None, "--quantize", metavar="8|4", rich_help_panel=_ATTACK,
        help="Round-to-nearest weight quantisation of the linear layers (symmetric, "
        "dequantised to float): of CKPT itself without --data, else of each run's final "
        "model."),
    group_size: int = typer.Option(
        None, "--group-size", metavar="G", rich_help_panel=_ATTACK,
        help="With --quantize: one scale per G input weights (default: per output channel)."),
    save_models: bool = typer.Option(
        False, "--save-models", help="Keep every attacked model under RESULTS_DIR/models "
        "(LoRA runs as adapters on CKPT)."),
    compare: list[str] = typer.Option(
        [], "--compare", metavar="[LABEL=]RESULTS_DIR",
        help="Only plot: the worst-case curves of these attack results (repeatable; e.g. "
        "base, unlearned, UNDO, oracle) into --out/compare.png. No CKPT then."),
    fail_if: list[str] = typer.Option(
        [], "--fail-if", metavar="EXPR", rich_help_panel=_MEASURE,
        help="Exit with code 3 (after writing the results) if EXPR holds, e.g. "
        "\"worst.forget.accuracy > 0.25\". Names: worst.SET.METRIC (at the end of the worst "
        "case), initial.SET.METRIC, final, auc, steps_to_threshold."),
    eval_batch_size: int = typer.Option(None, "--eval-batch-size", rich_help_panel=_MEASURE,
                                        help="Batch size of evaluation (default: automatic)."),
    eval_limit: int = typer.Option(None, "--eval-limit", metavar="N", rich_help_panel=_MEASURE,
                                   help="Evaluate a seeded sample of N records per set."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", rich_help_panel=_MEASURE,
                                       help="Longest generated answer when measuring accuracy."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Do not draw relearn.png."),
    *,
    opts: TrainingOptions,
) -> None:
    """`undo relearn-attack CKPT --data F --eval NAME=PATH --out DIR` (see the help text)."""
    if compare:
        if checkpoint is not None or data or eval_sets:
            raise UsageError("--compare only plots earlier results: give no CKPT, --data or "
                             "--eval with it")
        from undo_cli.cli import refuse_launch

        refuse_launch("undo relearn-attack --compare")
        from undo_cli.relearn import compare_results

        summary = compare_results(compare, out, overwrite=opts.overwrite,
                                  arguments={"compare": list(compare), "out": str(out)})
        if opts.json:
            emit_json(summary)
        elif not opts.quiet:
            info(f"wrote {out}/compare.png ({len(compare)} attacks)")
        return
    if checkpoint is None:
        raise UsageError("give the checkpoint to attack (CKPT), or --compare RESULTS_DIR ...")
    if not checkpoint.exists():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    from undo_cli.gates import parse_gates
    from undo_cli.records import parse_named_spec
    from undo_cli.relearn import AttackConfig, parse_lrs, relearn_checkpoint

    _parse_seeds(seeds)
    parse_gates(fail_if)  # malformed expressions fail before anything else
    config = AttackConfig(
        lrs=parse_lrs(lrs), steps=steps,
        eval_every=defaults.DEFAULT_EVAL_EVERY if opts.eval_every is None else opts.eval_every,
        seeds=[opts.seed + i for i in range(seeds)], mode="lora" if lora else "full",
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
        quantize=quantize, group_size=group_size,
        train=opts.train_config(out, lr=1e-4, max_steps=max(1, steps), state_dir=None),
        eval_batch_size=eval_batch_size, max_new_tokens=max_new_tokens, finetune=bool(data))
    evals = [parse_named_spec(spec, "--eval") for spec in eval_sets]
    from undo_cli.engine import is_main_process

    started = time.time()
    talk = not opts.quiet and is_main_process()  # one process reports under a launcher
    progress = _progress(enabled=talk)
    results = relearn_checkpoint(
        checkpoint, out, data=list(data), evals=evals, config=config,
        forget_metric=forget_metric, threshold=threshold, max_length=opts.max_length,
        eval_limit=eval_limit, save_models=save_models, fail_if=fail_if, raise_on_gate=False,
        plot=not no_plot, overwrite=opts.overwrite, allow_pickle=opts.allow_pickle,
        trust_remote_code=opts.trust_remote_code,
        arguments={"checkpoint": str(checkpoint), "data": list(data),
                   "eval": [list(e) for e in evals], "forget_metric": forget_metric,
                   "lrs": lrs, "steps": steps, "seeds": seeds, "lora": lora,
                   "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                   "lora_targets": lora_targets, "quantize": quantize,
                   "group_size": group_size, "threshold": threshold,
                   "fail_if": list(fail_if), "save_models": save_models, "out": str(out),
                   "train": {k: getattr(config.train, k) for k in (
                       "batch_size", "schedule", "warmup_steps", "min_lr", "weight_decay",
                       "grad_accum", "max_grad_norm", "bf16", "seed")},
                   "max_length": opts.max_length},
        progress=progress, note=info if talk else None)
    if opts.json and is_main_process():
        emit_json(results)
    if talk:
        render_results(results)
        info(f"wrote {out} in {time.time() - started:.1f}s")
    if results.get("gates"):
        from undo_cli.gates import raise_failed_gates

        raise_failed_gates(results["gates"])
