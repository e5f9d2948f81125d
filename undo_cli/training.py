"""`train_checkpoint`: plain language-model training (the library of `undo train`).

Pretraining from a preset (`tiny`, `small`: a new model built as `undo init` builds it) or
finetuning a checkpoint, with the cross-entropy loss on the engine; base models and
data-filtered oracles of the paper's protocol are made this way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from undo_cli import stage
from undo_cli.checkpoint import load_model, save_layout
from undo_cli.data import build_stream
from undo_cli.engine import lm_loss
from undo_cli.errors import UsageError
from undo_cli.modelfactory import (
    ARCHITECTURES,
    PRESETS,
    ModelShape,
    build_config,
    load_tokenizer_spec,
    random_model,
    resolve_shape,
)
from undo_cli.options import (
    TRAIN_STEPS,
    DataOptions,
    EvalOptions,
    LoadOptions,
    SaveOptions,
    TrainConfig,
)
from undo_cli.options.defaults import TRAIN
from undo_cli.options.rates import default_lr


def plan_train(out: str | Path, init: str, data: list[str], *, train: TrainConfig = TRAIN,
               data_options: DataOptions = DataOptions(), evals: EvalOptions = EvalOptions(),
               load: LoadOptions = LoadOptions(), arch: str | None = None,
               tokenizer: str | None = None, overwrite: bool = False,
               save: SaveOptions = SaveOptions()) -> stage.StagePlan:
    """The plan of `train_checkpoint` (every decision, before any work; nothing loaded but a
    preset's tokenizer, whose vocabulary sizes the new model)."""
    started = time.time()
    preset = init in PRESETS and not Path(init).exists()
    if not preset:
        if not Path(init).exists():
            raise UsageError(f"--init {init!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(PRESETS)})")
        if arch is not None or tokenizer is not None:
            raise UsageError("--arch and --tokenizer apply only when --init is a preset; a "
                             "checkpoint brings its own architecture and tokenizer")
    elif arch is not None and arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if train.lr is None:
        train = replace(train, lr=default_lr("train", preset=preset))
    if train.max_steps is None and train.max_tokens is None and train.max_flops is None:
        train = replace(train, max_steps=TRAIN_STEPS)
    inputs = [] if preset else [init]
    config, infos, data_options = stage.check_stage(
        out, inputs, train, data_options, load, overwrite=overwrite,
        reads=[*stage.data_paths("--data", data), *stage.eval_paths(evals),
               ("--tokenizer", tokenizer if preset and tokenizer else None)])
    shape = None
    if preset:
        shape = resolve_shape(init)
        if data_options.max_length > shape.max_position:
            shape = replace(shape, max_position=data_options.max_length)
        model_config = build_config(arch or "llama", shape,
                                    load_tokenizer_spec(tokenizer or "char")).to_dict()
    else:
        model_config = infos[0].config
    arguments = stage.arguments(
        config, data_options, evals, init=init, data=list(data),
        preset=init if preset else None, arch=(arch or "llama") if preset else None,
        tokenizer=(tokenizer or "char") if preset else None,
        shape=asdict(shape) if shape else None)
    return stage.StagePlan(
        "train", Path(out), tuple(inputs), tuple(infos), config, data_options, evals, load,
        memory=stage.memory_plan(model_config, config, length=data_options.max_length),
        arguments=arguments,
        parents=stage.with_bases({} if preset else {"init": init}, infos),
        layout=save_layout(save, infos[0] if infos else None),
        source=None if preset else init, overwrite=overwrite, started=started)


def train_checkpoint(out: str | Path, init: str, data: list[str], *,
                     train: TrainConfig = TRAIN, data_options: DataOptions = DataOptions(),
                     evals: EvalOptions = EvalOptions(), load: LoadOptions = LoadOptions(),
                     arch: str | None = None, tokenizer: str | None = None,
                     overwrite: bool = False, callbacks: stage.Callbacks | None = None,
                     save: SaveOptions = SaveOptions()) -> dict[str, Any]:
    """Train on `data` (`PATH[:WEIGHT]` specs) from `init` (a checkpoint directory, or a size
    preset with `arch` and `tokenizer`) and write the result to `out`; returns the summary.

    `train.lr` None means `default_lr` (PRESET_LR from a preset, FINETUNE_LR from a
    checkpoint); no budget means `TRAIN_STEPS` steps. The model is written in the checkpoint's
    dtype and sharding unless `save` says otherwise (fp32, one file, from a preset).
    """
    plan = plan_train(out, init, data, train=train, data_options=data_options, evals=evals,
                      load=load, arch=arch, tokenizer=tokenizer, overwrite=overwrite, save=save)
    config, length = plan.config, plan.data_options.max_length
    preset = not plan.inputs

    def tokenizer_of_run():
        if preset:
            return load_tokenizer_spec(tokenizer or "char")
        return stage.tokenizer_of(init, load)

    def prepare(tok, sets) -> stage.Job:  # noqa: ARG001 - the runner measures the sets
        # Data first: a bad file fails before any model is built or loaded.
        streams = {"train": build_stream(tok, data, length, config.batch_size, config.seed,
                                         name="train", packing=plan.data_options.packing)}
        if preset:
            shape = ModelShape(**plan.arguments["shape"])
            model = random_model(build_config(plan.arguments["arch"], shape, tok),
                                 seed=config.seed)
        else:
            model = load_model(init, allow_pickle=load.allow_pickle,
                               trust_remote_code=load.trust_remote_code,
                               base_model=load.base_model)
        return stage.Job(model, lm_loss("train"), streams,
                         summary=lambda written: {"init": init})

    return stage.run_stage(plan, tokenizer_of_run, prepare, callbacks=callbacks)
