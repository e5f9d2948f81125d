"""`undo train`: plain language-model training (pretraining from a preset, or finetuning)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import TrainingOptions, emit_json, info, training_options
from undo_cli.errors import UsageError

DEFAULT_STEPS = 1000


@app.command("train")
@training_options(
    defaults={"lr": None},
    help={"lr": "Peak learning rate (AdamW). Default: 1e-3 from a preset, 1e-4 from a "
                "checkpoint.",
          "max_steps": f"Stop after this many optimizer steps. Default: {DEFAULT_STEPS} unless "
                       "--max-tokens is given."},
)
def train_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    init: str = typer.Option(
        ..., "--init", metavar="CKPT_OR_PRESET",
        help="A checkpoint directory to finetune, or a size preset (tiny, small) to pretrain "
        "from scratch."),
    data: list[str] = typer.Option(
        ..., "--data", metavar="PATH[:WEIGHT]",
        help="Training data, repeatable with mixing weights: .jsonl, .json, .csv, .parquet or "
        "a saved datasets directory; {\"text\"} records are packed into --max-length blocks, "
        "{\"prompt\", \"completion\"} records train on the completion only."),
    eval_sets: list[str] = typer.Option(
        [], "--eval", metavar="NAME=PATH",
        help="Held-out data evaluated every --eval-every steps and at the end (metrics "
        "NAME.loss, NAME.accuracy, ...; repeatable)."),
    arch: str = typer.Option(
        None, help="With a preset: llama (default), gemma2, gpt2 or qwen2."),
    tokenizer: str = typer.Option(
        None, help="With a preset: 'char' (default), 'char:ALPHABET', a tokenizer.json file or "
        "a directory holding a tokenizer."),
    *,
    opts: TrainingOptions,
) -> None:
    """Train a language model on text or prompt/completion data.

    --init PRESET (tiny, small): a new model, built as `undo init` builds it, is pretrained.
    --init CHECKPOINT: that model is finetuned.

    OUT gets the model, its tokenizer, train_log.jsonl and undo.json (tokens and FLOPs spent).
    """
    from undo_cli.checkpoint import (
        build_manifest,
        check_output_path,
        inspect_checkpoint,
        load_model,
        load_tokenizer,
        save_model,
        write_manifest,
    )
    from undo_cli.data import build_stream
    from undo_cli.engine import (
        lm_loss,
        train,
        training_output,
    )
    from undo_cli.modelfactory import (
        ARCHITECTURES,
        PRESETS,
        build_config,
        load_tokenizer_spec,
        random_model,
        resolve_shape,
    )
    from undo_cli.records import parse_named_spec

    started = time.time()
    preset = init in PRESETS and not Path(init).exists()
    if not preset:
        if not Path(init).exists():
            raise UsageError(f"--init {init!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(PRESETS)})")
        if arch is not None or tokenizer is not None:
            raise UsageError("--arch and --tokenizer apply only when --init is a preset; a "
                             "checkpoint brings its own architecture and tokenizer")
        inspect_checkpoint(init, allow_pickle=opts.allow_pickle)
    elif arch is not None and arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    lr = opts.lr if opts.lr is not None else (1e-3 if preset else 1e-4)
    max_steps = opts.max_steps
    if max_steps is None and opts.max_tokens is None:
        max_steps = DEFAULT_STEPS
    config = opts.train_config(out, lr=lr, max_steps=max_steps)
    config.validate()
    inputs = [] if preset else [init]
    check_output_path(out, inputs=inputs, overwrite=opts.overwrite)
    named_evals = [parse_named_spec(spec, "--eval") for spec in eval_sets]

    # Tokenizer and data first: a bad file fails before any model is built or loaded.
    if preset:
        tok = load_tokenizer_spec(tokenizer or "char")
    else:
        tok = load_tokenizer(init, trust_remote_code=opts.trust_remote_code)
    streams = {"train": build_stream(tok, data, opts.max_length, opts.batch_size, opts.seed,
                                     name="train")}
    sets = []
    if named_evals:
        from undo_cli.evaluate import load_eval_set

        sets = [load_eval_set(name, path, tok) for name, path in named_evals]

    shape = None
    if preset:
        shape = resolve_shape(init)
        if opts.max_length > shape.max_position:
            shape = replace(shape, max_position=opts.max_length)
        model = random_model(build_config(arch or "llama", shape, tok), seed=opts.seed)
    else:
        model = load_model(init, allow_pickle=opts.allow_pickle,
                           trust_remote_code=opts.trust_remote_code)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None)
        if limit is not None and opts.max_length > limit:
            raise UsageError(f"--max-length {opts.max_length} exceeds the model's maximum "
                             f"length {limit}")

    evaluate = None
    if sets:
        from undo_cli.evaluate import evaluate_model, flatten_metrics

        def evaluate(m, step):  # noqa: ARG001 - the engine passes the step
            return flatten_metrics(evaluate_model(m, tok, sets))

    arguments = {
        "init": init, "data": list(data), "eval": [list(e) for e in named_evals],
        "preset": init if preset else None,
        "arch": (arch or "llama") if preset else None,
        "tokenizer": (tokenizer or "char") if preset else None,
        "shape": asdict(shape) if shape else None, "max_length": opts.max_length,
        "train": {k: v for k, v in asdict(config).items()
                  if k not in ("log_path", "quiet", "state_dir", "resume", "device")},
    }
    with training_output(out, config, inputs=inputs, overwrite=opts.overwrite) as (tmp, run):
        result = train(model, lm_loss("train"), streams, run, evaluate=evaluate)
        if tmp is not None:
            save_model(result.model, tok, tmp, source=None if preset else init)
            write_manifest(tmp, build_manifest(
                "train", arguments=arguments, parents={} if preset else {"init": init},
                seed=opts.seed, wall_time_s=time.time() - started, compute=result.compute(),
                metrics={"train": result.loss, **result.final_metrics()},
                extra={"parameters": result.parameters,
                       "data": {k: s.describe() for k, s in streams.items()}},
            ))
    if not result.is_main_process:
        return
    summary = {"output": str(out), "init": init, "steps": result.steps, "tokens": result.tokens,
               "flops": result.flops["total"], "parameters": result.parameters,
               "loss": result.loss.get("loss"), "stop_reason": result.stop_reason,
               "diverged_step": result.diverged_step, "resumed_from": result.resumed_from,
               "wall_time_s": round(time.time() - started, 3),
               "metrics": result.final_metrics()}
    if opts.json:
        emit_json(summary)
    else:
        loss = f", final loss {summary['loss']:.4g}" if summary["loss"] is not None else ""
        info(f"wrote {out}: {result.steps} steps, {result.tokens:,} tokens, "
             f"{result.flops['total']:.3g} FLOPs{loss}")
        if result.diverged:
            info(f"warning: {result.stop_reason}; wrote the last finite weights")
