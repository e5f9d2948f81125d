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
from undo_cli.options.paths import plain_paths, weighted_paths


@app.command("train")
@with_options("train", reads={"init": plain_paths, "data": weighted_paths,
                                    "tokenizer": plain_paths},
              train=TrainConfig, data_options=DataOptions, evals=EvalOptions,
              load=LoadOptions, save=SaveOptions, output=OutputOptions, exclude=("sam_rho",))
def train_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    init: str = typer.Option(
        ..., "--init", metavar="CKPT_OR_PRESET",
        help="A checkpoint directory to finetune, or a size preset (tiny, small) to pretrain "
        "from scratch."),
    data: list[str] = typer.Option(
        ..., "--data", metavar="PATH[:WEIGHT]",
        help="Training data, repeatable with mixing weights: .jsonl, .json, .csv, .parquet or "
        "a saved datasets directory; {\"text\"} records are packed into --max-length rows, "
        "{\"prompt\", \"completion\"} records train on the completion only."),
    arch: str = typer.Option(
        None, help="With a preset: llama (default), gemma2, gpt2 or qwen2."),
    tokenizer: str = typer.Option(
        None, help="With a preset: 'char' (default), 'char:ALPHABET', a tokenizer.json file or "
        "a directory holding a tokenizer."),
    *,
    train: TrainConfig = TRAIN,
    data_options: DataOptions,
    evals: EvalOptions,
    load: LoadOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """Train a language model on text or prompt/completion data.

    --init PRESET (tiny, small): a new model, built as `undo init` builds it, is pretrained.
    --init CHECKPOINT: that model is finetuned.

    OUT gets the model, its tokenizer, train_log.jsonl and undo.json (tokens and FLOPs spent).
    """
    from undo_cli.training import train_checkpoint

    summary = run_stage(output, "train", lambda callbacks: train_checkpoint(
        out, init, list(data), train=train, data_options=data_options, evals=evals, load=load,
        arch=arch, tokenizer=tokenizer, overwrite=output.overwrite, callbacks=callbacks,
        save=save))
    if summary is not None:
        loss = f", final loss {summary['loss']:.4g}" if summary["loss"] is not None else ""
        info(f"wrote {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
             f"{summary['flops']:.3g} FLOPs{loss}")
