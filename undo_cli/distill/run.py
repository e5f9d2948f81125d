"""`distill_checkpoint`, the library entry point of `undo distill`: the student's initial
weights (`build_student`), what trains, the teachers, and the stage skeleton around the
engine."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from undo_cli import stage
from undo_cli.checkpoint import fingerprint, load_model, save_layout
from undo_cli.data import build_stream, fit_packing
from undo_cli.distill.loss import kd_loss_fn
from undo_cli.distill.teachers import TeacherCache, TeacherSwitch
from undo_cli.engine import training_device
from undo_cli.errors import UsageError
from undo_cli.evaluate import expected_metrics
from undo_cli.modelfactory import random_model
from undo_cli.options import (
    DISTILL_EVAL_EVERY,
    DISTILL_STOP_WHEN_CAP,
    TRAIN_STEPS,
    DataOptions,
    DistillOptions,
    EvalOptions,
    LoadOptions,
    NoiseOptions,
    SaveOptions,
    TrainConfig,
)
from undo_cli.options.defaults import DISTILL, DISTILL_NOISE
from undo_cli.options.text import layer_numbers
from undo_cli.perturb import noise_selection, perturb_model_

RANDOM_STUDENT_SEED_OFFSET = 7919
LISTED_NAMES = 50  # tensor names listed in the manifest per category (then only counted)


def build_student(spec: str, teacher, noise: NoiseOptions, noise_seed: int, seed: int, *,
                  load: LoadOptions = LoadOptions(), only: Sequence[str] | None = None):
    """The model to train: a checkpoint, `random` (fresh init with the teacher's config), or,
    with `--alpha/--beta`, the teacher noised in memory exactly as `undo perturb` would (with
    the same --layers / --include / --exclude selection; `only`, if given, limits the noise to
    exactly those tensor names). Tensors outside the selection keep the teacher's values."""


    if noise.alpha is not None:
        if spec not in ("teacher", ""):
            raise UsageError("--alpha/--beta noise the teacher in memory: give --student "
                             "teacher (or leave --student out), not another model")
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        perturb_model_(student, noise, noise_seed, only=only)
        return student
    if spec == "random":
        # A seed of its own: `undo init --seed S` and `--seed S` here must not give the base
        # model's starting weights back.
        return random_model(teacher.config, seed=RANDOM_STUDENT_SEED_OFFSET + seed)
    if spec == "teacher":
        raise UsageError("--student teacher noises the teacher in memory: give --alpha A "
                         "--beta B (the paper: --alpha 0.6 --beta 0.1)")
    if spec == "":
        raise UsageError("--student is needed: a checkpoint directory (e.g. the output of "
                         "`undo perturb`), `random`, or `teacher` with --alpha/--beta")
    return load_model(spec, allow_pickle=load.allow_pickle,
                      trust_remote_code=load.trust_remote_code, base_model=load.base_model)


def check_compatible(teacher, student, teacher_tok, student_tok, *,
                     what: str = "teacher and student") -> None:
    """Teacher and student must share the tokenizer and the vocabulary size."""
    tv = teacher.get_output_embeddings().weight.shape[0]
    sv = student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise UsageError(f"{what} vocabularies differ ({tv} vs {sv} tokens): "
                         "distillation needs the same tokenizer")
    if student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UsageError(f"{what} tokenizers differ: distillation needs the same tokenizer")


def _shape(model) -> tuple[int | None, int | None]:
    """(decoder layers, hidden size) from a model's config."""
    config = model.config
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer")
                   if isinstance(getattr(config, k, None), int)), None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd")
                   if isinstance(getattr(config, k, None), int)), None)
    return layers, hidden


def hidden_layer_list(options: DistillOptions, student, teachers: Sequence[Any]
                      ) -> list[int] | None:
    """The decoder layers the hidden-state term compares (None: the term is off); checks
    that student and teachers have the same number of layers and hidden size."""
    if not options.hidden_loss_weight > 0:
        return None
    shape = _shape(student)
    for teacher in teachers:
        if _shape(teacher) != shape or None in shape:
            raise UsageError(f"--hidden-loss-weight compares hidden states layer by layer: "
                             f"student and teacher need the same number of layers and hidden "
                             f"size (student {shape}, teacher {_shape(teacher)})")
    layers = layer_numbers(options.hidden_layers)
    if layers is None:
        return list(range(shape[0]))
    if layers[-1] >= shape[0]:
        raise UsageError(f"--hidden-layers {options.hidden_layers}: the model has {shape[0]} "
                         f"decoder layers (0..{shape[0] - 1})")
    return list(layers)


@dataclass(frozen=True)
class Selection:
    """What trains and what is noised, decided on the teacher's meta model before any weight
    loads (undo.json's `distill` record)."""
    trained: list[str] | None  # names of the trained parameters (None: all)
    noise_only: list[str] | None  # the noise limited to these names (the trained ones)
    noise: dict[str, Any] | None  # the manifest's record of the in-memory noise


def select(teacher, options: DistillOptions, noise: NoiseOptions) -> Selection:
    """The `Selection` of a distillation on `teacher` (a model, on the meta device or not)."""
    trained = None
    if options.train_pattern is not None or options.train_layers is not None:
        trained = [n for n, _ in stage.select_parameters(
            teacher, options.train_pattern, options.train_layers, pattern_flag="--train")]
    own = noise.layers is not None or noise.include or noise.exclude
    only = trained if (trained is not None and not own) else None
    record = None
    if noise.alpha is not None:
        record = noise_selection(teacher, noise, only=only)
        for key in ("noised", "shrunk"):
            record[f"{key}_count"] = len(record[key])
            record[key] = record[key][:LISTED_NAMES]
    return Selection(trained=trained, noise_only=only, noise=record)


@dataclass(frozen=True)
class DistillPlan:
    """Every decision of a distillation before any weight loads: the stage's plan (budget,
    memory, undo.json), what trains and is noised (None where the teacher's meta model cannot
    be built: then decided on the loaded teacher), and the distillation's own settings."""
    stage: stage.StagePlan
    selection: Selection | None
    options: DistillOptions
    noise: NoiseOptions
    data: tuple[str, ...]
    student: str  # a checkpoint directory, `random` or `teacher`


def plan_distill(teacher_path: str | Path, student: str, out: str | Path, *,
                 data: Sequence[str], options: DistillOptions = DistillOptions(),
                 noise: NoiseOptions = DISTILL_NOISE, train: TrainConfig = DISTILL,
                 data_options: DataOptions = DataOptions(), evals: EvalOptions = EvalOptions(),
                 load: LoadOptions = LoadOptions(), overwrite: bool = False,
                 save: SaveOptions = SaveOptions()) -> DistillPlan:
    """The plan of `distill_checkpoint`, before any weight loads: the budget (a cap and an
    evaluation interval under --stop-when alone), the student, what trains and is noised
    (on the teacher's meta model; None where it cannot be built, then decided on the loaded
    teacher), the memory plan (the student's trained parameters, the teachers frozen)."""
    from undo_cli.checkpoint.inspection import estimate_parameters

    started = time.time()
    teacher_path = Path(teacher_path)
    student = student or ("teacher" if noise.alpha is not None else "")
    if train.max_steps is None and train.max_tokens is None and train.max_flops is None:
        train = replace(train, max_steps=DISTILL_STOP_WHEN_CAP if options.stop_when
                        else TRAIN_STEPS)
    if options.stop_when and train.eval_every is None:
        train = replace(train, eval_every=DISTILL_EVAL_EVERY)
    if options.stop_when and not evals.eval:
        raise UsageError("--stop-when needs --eval sets to measure")
    if student in ("teacher", "") and noise.alpha is None:
        build_student(student, None, noise, 0, train.seed)  # the clear error, before work
    student_is_dir = student not in ("random", "teacher", "")
    second_path = Path(options.second_teacher) if options.second_teacher is not None else None
    inputs = ([teacher_path] + ([Path(student)] if student_is_dir else [])
              + ([second_path] if second_path is not None else []))
    config, infos, data_options = stage.check_stage(
        out, inputs, train, data_options, load, overwrite=overwrite,
        reads=[*stage.data_paths("--data", data), *stage.eval_paths(evals)],
        writes=[("--cache-teacher", options.cache_teacher)])
    if student_is_dir:
        stage.check_length(data_options.max_length, infos[1].config)
    meta = stage.meta_model(infos[0].config)
    selection = None if meta is None else select(meta, options, noise)
    student_config = infos[1].config if student_is_dir else infos[0].config
    teachers = [infos[0]] + ([infos[-1]] if second_path is not None else [])
    trainable = None
    if options.train_pattern is not None or options.train_layers is not None:
        trainable = stage.meta_trainable(student_config, lambda model: stage.select_parameters(
            model, options.train_pattern, options.train_layers, pattern_flag="--train"))
    memory = stage.memory_plan(
        student_config, config, length=data_options.max_length, trainable=trainable,
        frozen_parameters=sum(estimate_parameters(t.config) or 0 for t in teachers))
    parents = {"teacher": teacher_path,
               **({"student": Path(student)} if student_is_dir else {}),
               **({"second_teacher": second_path} if second_path is not None else {})}
    arguments = stage.arguments(config, data_options, evals, teacher=teacher_path,
                                student=student, data=list(data), settings=asdict(options),
                                noise=asdict(noise))
    plan = stage.StagePlan(
        "distill", Path(out), tuple(inputs), tuple(infos), config, data_options, evals, load,
        memory=memory, arguments=arguments, parents=stage.with_bases(parents, infos),
        layout=save_layout(save, infos[1] if student_is_dir else infos[0]),
        source=teacher_path, overwrite=overwrite, started=started)
    return DistillPlan(plan, selection, options, noise, tuple(data), student)


def distill_checkpoint(teacher_path: str | Path, student: str, out: str | Path, *,
                       data: Sequence[str], options: DistillOptions = DistillOptions(),
                       noise: NoiseOptions = DISTILL_NOISE, train: TrainConfig = DISTILL,
                       data_options: DataOptions = DataOptions(),
                       evals: EvalOptions = EvalOptions(), load: LoadOptions = LoadOptions(),
                       overwrite: bool = False, callbacks: stage.Callbacks | None = None,
                       save: SaveOptions = SaveOptions()) -> dict[str, Any]:
    """Distil `teacher_path` into `student` (a checkpoint, `random`, or `teacher` noised in
    memory with `noise`, as `undo perturb` with seed `options.perturb_seed`) on `data` and
    write the result to `out`; returns the summary printed by `undo distill`.

    No budget in `train` means `TRAIN_STEPS` steps, or with `options.stop_when` alone a
    generous cap (`DISTILL_STOP_WHEN_CAP`) and evaluation every `DISTILL_EVAL_EVERY` steps
    unless `train.eval_every` says otherwise; the `evals` sets are measured on the teacher
    once and on the student at each evaluation. The model is written in the student's dtype
    and sharding (the teacher's for `random` and `teacher`) unless `save` says otherwise.

    `options.train_pattern` / `train_layers` train only the selected parameters (the others
    are frozen and absent from the optimizer; the in-memory noise then touches only them
    unless `noise` selects tensors itself); `hidden_loss_weight` adds the hidden-state term;
    `second_teacher` gives the targets of a `second_teacher_fraction` of the micro-batches.
    """
    plan = plan_distill(teacher_path, student, out, data=data, options=options, noise=noise,
                        train=train, data_options=data_options, evals=evals, load=load,
                        overwrite=overwrite, save=save)
    return stage.run_stage(plan.stage, lambda: stage.tokenizer_of(teacher_path, plan.stage.load),
                           partial(distill_job, plan), callbacks=callbacks)


@dataclass
class _Models:
    teacher: Any
    student: Any
    second: Any  # the second teacher, or None
    selection: Selection
    parameters: list[Any] | None  # the trained parameters (None: all)


def _load_models(plan: DistillPlan, tok, tokenizers: dict[str, Any], device) -> _Models:
    """Teacher, student and second teacher on `device`, checked against each other and their
    `tokenizers` (by role), and what trains (the plan's selection, or decided on the loaded
    teacher)."""
    load, options, paths = plan.stage.load, plan.options, plan.stage.parents

    def frozen_model(path: Path):
        model = load_model(path, allow_pickle=load.allow_pickle,
                           trust_remote_code=load.trust_remote_code,
                           base_model=load.base_model).to(device).eval()
        return model.requires_grad_(False)

    teacher = frozen_model(paths["teacher"])
    selection = plan.selection
    if selection is None:  # the teacher's meta model could not be built (custom code)
        selection = select(teacher, options, plan.noise)
    student = build_student(plan.student, teacher, plan.noise, options.perturb_seed,
                            plan.stage.config.seed, load=load, only=selection.noise_only)
    check_compatible(teacher, student, tok, tokenizers.get("student"))
    second = None
    if "second_teacher" in paths:
        second = frozen_model(paths["second_teacher"])
        check_compatible(teacher, second, tok, tokenizers["second_teacher"],
                         what="teacher and second teacher")
    parameters = None
    if selection.trained is not None:  # the same names on the student (checked)
        named = dict(student.named_parameters())
        missing = [n for n in selection.trained if n not in named]
        if missing:
            raise UsageError(f"the student has no parameter {missing[0]} selected by "
                             "--train/--train-layers on the teacher: give a student of "
                             "the teacher's architecture")
        parameters = [named[n] for n in selection.trained]
    return _Models(teacher, student, second, selection, parameters)


def distill_job(plan: DistillPlan, tok, sets) -> stage.Job:
    """What `run_stage` trains for `plan`: the data stream first, then the models, the
    teacher's targets (live, cached or from two teachers) and the distillation loss."""
    config, options, data = plan.stage.config, plan.options, plan.data
    length, packing = plan.stage.data_options.max_length, plan.stage.data_options.packing
    teacher_path = plan.stage.parents["teacher"]
    stop = options.stop_when.condition if options.stop_when else None
    tokenizers = {role: stage.tokenizer_of(path, plan.stage.load)
                  for role, path in plan.stage.parents.items()
                  if role in ("student", "second_teacher")}
    stream = build_stream(tok, data, length, config.batch_size, config.seed, name="train",
                          packing=packing)
    if stop is not None:  # before any model is loaded
        stop.check_names(set(expected_metrics(sets)))
    device = training_device(config.device)
    models = _load_models(plan, tok, tokenizers, device)
    teacher, second, selection = models.teacher, models.second, models.selection
    hidden_layers = hidden_layer_list(options, models.student,
                                      [t for t in (teacher, second) if t])
    teacher_metrics = stage.measure(tok, sets, plan.stage.evals)(teacher) if sets else {}
    streams, frozen_rate, amend = _teacher_sources(
        stream, teacher, second, options, device, seed=config.seed,
        cache_key=lambda: {
            "teacher": fingerprint(teacher_path), "data": list(data), "seed": config.seed,
            "batch_size": config.batch_size, "max_length": length,
            "packing": "documents-padded" if stream.padded_documents else packing})
    fit_packing(streams, [m for m in (teacher, models.student, second) if m is not None])
    loss_fn = kd_loss_fn(teacher, temperature=options.temperature,
                         ce_weight=options.ce_weight, chunk_size=options.kd_chunk_size,
                         hidden_weight=options.hidden_loss_weight,
                         hidden_layers=hidden_layers, second_teacher=second)
    should_stop = None
    if stop is not None:
        def should_stop(step, metrics):  # noqa: ARG001
            return (f"stop_when: {stop.text}" if stop.holds(metrics, teacher_metrics)
                    else None)

    record = {
        "trained": None if selection.trained is None else {
            "pattern": options.train_pattern,
            "layers": list(layer_numbers(options.train_layers) or []) or None,
            "names": selection.trained[:LISTED_NAMES], "count": len(selection.trained)},
        "noise": selection.noise,
        "hidden_loss": None if hidden_layers is None else {
            "weight": options.hidden_loss_weight, "layers": hidden_layers},
    }

    def summary(written: stage.Written) -> dict[str, Any]:
        compute = written.compute
        return {"teacher": str(teacher_path), "student": plan.student,
                "flops_student": compute["flops_student"],
                "flops_teacher": compute["flops_teacher"],
                "kd_loss": written.result.loss.get("kd_loss"),
                "teacher_metrics": teacher_metrics,
                **({"second_teacher": compute["second_teacher"]}
                   if "second_teacher" in compute else {})}

    return stage.Job(models.student, loss_fn, streams, parameters=models.parameters,
                     frozen_forward_params=frozen_rate, should_stop=should_stop,
                     compute=amend, summary=summary,
                     extra={"teacher_metrics": teacher_metrics, "distill": record})


def _teacher_sources(stream, teacher, second, options: DistillOptions, device, *, seed: int,
                     cache_key: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], int, Any]:
    """Where the targets come from: the teacher on every micro-batch, its `--cache-teacher`
    (the teacher runs only on batches missing from the cache, keyed by `cache_key()`), a second
    teacher on a share of them. Returns (the streams, the frozen parameters the engine
    charges per token, `amend(compute)`: the compute record with the teachers' real FLOPs)."""
    frozen = _size(teacher)
    streams: dict[str, Any] = {"train": stream}
    frozen_rate = frozen
    cache = switch = None
    if options.cache_teacher is not None:
        cache = TeacherCache(stream, teacher, options.cache_teacher, cache_key(),
                             k=options.cache_topk, temperature=options.temperature,
                             device=device)
        streams, frozen_rate = {"train": cache}, 0
    if second is not None:
        switch = TeacherSwitch(stream, options.second_teacher_fraction, seed)
        streams = {"train": switch}
        p = options.second_teacher_fraction
        frozen_rate = round((1 - p) * frozen + p * _size(second))  # exact: `amend`

    def amend(compute: dict) -> dict:
        if cache is not None:
            compute["flops_frozen"] = 2.0 * frozen * cache.teacher_tokens
            compute["teacher_cache"] = {"dir": str(options.cache_teacher), "hits": cache.hits,
                                        "teacher_tokens": cache.teacher_tokens}
        if switch is not None:  # each teacher ran on its own micro-batches
            compute["flops_frozen"] = 2.0 * (frozen * switch.tokens[0]
                                             + _size(second) * switch.tokens[1])
            compute["second_teacher"] = switch.describe_use()
        compute["flops"] = compute["flops_trained"] + compute["flops_frozen"]
        compute["flops_student"] = compute["flops_trained"]
        compute["flops_teacher"] = compute["flops_frozen"]
        return compute

    return streams, frozen_rate, amend


def _size(model) -> int:
    """Distinct parameters of `model` (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
