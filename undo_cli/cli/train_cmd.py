"""`undo train`: plain language-model training (pretraining from a preset, or finetuning)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import info
from undo_cli.cli.options import with_options
from undo_cli.cli.progress import run_stage
from undo_cli.options import (
    DataOptions,
    EvalOptions,
    LoadOptions,
    OutputOptions,
    SaveOptions,
    TrainConfig,
)
from undo_cli.options.defaults import TRAIN
from undo_cli.options.inputs import TrainInputs


@app.command("train")
@with_options("train", inputs=TrainInputs, train=TrainConfig, data_options=DataOptions,
              evals=EvalOptions, load=LoadOptions, save=SaveOptions, output=OutputOptions,
              exclude=("sam_rho",))
def train_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    *,
    inputs: TrainInputs,
    train: TrainConfig = TRAIN,
    data_options: DataOptions,
    evals: EvalOptions,
    load: LoadOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """Train a language model on text or prompt/completion data.

    - --init PRESET (tiny, small): a new model, built as `undo init` builds it, is pretrained.
    - --init CHECKPOINT: that model is finetuned.

    OUT gets the model, its tokenizer, train_log.jsonl and undo.json (tokens and FLOPs spent).
    """
    from undo_cli.training import train_checkpoint

    summary = run_stage(output, "train", lambda callbacks: train_checkpoint(
        out, inputs.init, list(inputs.data), train=train, data_options=data_options,
        evals=evals, load=load, arch=inputs.arch, tokenizer=inputs.tokenizer,
        overwrite=output.overwrite, callbacks=callbacks, save=save))
    if summary is not None:
        loss = f", final loss {summary['loss']:.4g}" if summary["loss"] is not None else ""
        info(f"wrote {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
             f"{summary['flops']:.3g} FLOPs{loss}")
