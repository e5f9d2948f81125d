"""`undo distill`: forward-KL distillation into a noised copy or a fresh init."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import info
from undo_cli.cli.options import with_options
from undo_cli.cli.progress import run_stage
from undo_cli.options import (
    DataOptions,
    DistillOptions,
    EvalOptions,
    LoadOptions,
    NoiseOptions,
    OutputOptions,
    SaveOptions,
    TrainConfig,
)
from undo_cli.options.defaults import DISTILL, DISTILL_NOISE
from undo_cli.options.inputs import DistillInputs


@app.command("distill")
@with_options("distill", inputs=DistillInputs, train=TrainConfig, data_options=DataOptions,
              evals=EvalOptions, distill=DistillOptions, noise=NoiseOptions, load=LoadOptions,
              save=SaveOptions, output=OutputOptions, exclude=("sam_rho",))
def distill_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    *,
    inputs: DistillInputs,
    train: TrainConfig = DISTILL,
    data_options: DataOptions,
    evals: EvalOptions,
    distill: DistillOptions,
    noise: NoiseOptions = DISTILL_NOISE,
    load: LoadOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """Distil a teacher into a noised copy or a fresh init (forward KL on outputs).

    The loss is KL(teacher || student) over next-token distributions on every trained
    position, the teacher frozen in eval mode. The --eval sets are measured on the teacher
    once and on the student every --eval-every steps; --stop-when compares the two. OUT gets
    the student, train_log.jsonl and undo.json (student and teacher FLOPs, steps, tokens, stop
    reason, final metrics, what was trained and noised).

    The paper's WMDP toolbox: --train REGEX / --train-layers 10-15 train only some parameters
    (the rest frozen, out of the optimizer, and charged only the backward they need);
    --hidden-loss-weight W adds W * MSE between the student's and the teacher's residual
    states at --hidden-layers; --second-teacher CKPT --second-teacher-fraction P takes the
    targets of a fraction P of the micro-batches from another model (e.g. the one before
    unlearning). Its WMDP setting: --student teacher --alpha 0.25 --beta 0.
    """
    from undo_cli.distill import distill_checkpoint

    summary = run_stage(output, "distill", lambda callbacks: distill_checkpoint(
        inputs.teacher, inputs.student, out, data=list(inputs.data), options=distill,
        noise=noise, train=train, data_options=data_options, evals=evals, load=load,
        overwrite=output.overwrite, callbacks=callbacks, save=save))
    if summary is not None:
        kd = summary["kd_loss"]
        info(f"wrote {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
             f"kd_loss {kd:.4g}, stopped by {summary['stop_reason']}" if kd is not None else
             f"wrote {out}: {summary['steps']} steps, stopped by {summary['stop_reason']}")
