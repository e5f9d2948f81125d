"""What every command that trains does around the engine, written once.

A stage (`train`, `unlearn`, `distill`; `relearn-attack` uses the checks and the evaluation)
runs: check the settings and the output path against the inputs -> inspect the input
checkpoints -> check the row length against the model -> tokenizer -> data streams -> eval
sets -> load the models -> train with an evaluation hook -> save the model, its tokenizer,
`train_log.jsonl` and `undo.json`, atomically. The stage functions
(`undo_cli.training.train_checkpoint`, `undo_cli.unlearn.unlearn_checkpoint`,
`undo_cli.distill.distill_checkpoint`) are that skeleton with their own loss; the pieces here
are the parts they share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.options import (
    DEFAULT_MAX_LENGTH,
    DataOptions,
    EvalOptions,
    LoadOptions,
    TrainConfig,
    compile_pattern,
)
from undo_cli.records import parse_weighted_spec

log = logging.getLogger(__name__)

TRACKER_DIR = "runs"  # --report-to's default --logging-dir inside OUT
OnStep = Callable[[int, "int | None", int], None]
OnLog = Callable[[dict[str, Any]], None]


@dataclass
class Callbacks:
    """How a stage reports progress (the command line draws its progress bar from these)."""

    on_step: OnStep | None = None  # (step, planned steps or None, tokens)
    on_log: OnLog | None = None  # each training-log entry: train, eval, diverged


def length_limit(config: Any) -> int | None:
    """The longest sequence a model takes, from its config (a dict or a transformers config)."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for key in ("max_position_embeddings", "n_positions"):
        value = get(key)
        if isinstance(value, int):
            return value
    return None


def check_length(max_length: int, config: Any) -> None:
    """`UsageError` if rows of `max_length` tokens do not fit the model."""
    limit = length_limit(config)
    if limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's maximum length "
                         f"{limit}")


def fit_length(data_options: DataOptions, config: Any = None) -> DataOptions:
    """`data_options` with `max_length` decided: as given (checked against the model of
    `config`), or by default `DEFAULT_MAX_LENGTH` or the model's maximum length if that is
    smaller (said once on stderr)."""
    if data_options.max_length is not None:
        if config is not None:
            check_length(data_options.max_length, config)
        return data_options
    limit = length_limit(config) if config is not None else None
    if limit is not None and limit < DEFAULT_MAX_LENGTH:
        log.info("note: --max-length %d, the model's maximum length (the default is %d)",
                 limit, DEFAULT_MAX_LENGTH)
        return replace(data_options, max_length=limit)
    return replace(data_options, max_length=DEFAULT_MAX_LENGTH)


Paths = Sequence[tuple[str, "str | Path | None"]]  # (flag, path) pairs


def data_paths(flag: str, specs: Sequence[Any]) -> list[tuple[str, str]]:
    """`(flag, PATH)` of `PATH[:WEIGHT]` data specs (or `(path, weight)` pairs)."""
    paths = []
    for spec in specs:
        path = (str(spec[0]) if isinstance(spec, (tuple, list))
                else parse_weighted_spec(spec, flag)[0])
        paths.append((flag, path))
    return paths


def eval_paths(evals: EvalOptions, flag: str = "--eval") -> list[tuple[str, str]]:
    """`(flag, PATH)` of the `NAME=PATH` eval sets."""
    return [(flag, path) for _, path in evals.sets]


def _inside(path: str | Path, other: str | Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(other).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def check_inputs(out: str | Path, inputs: Sequence[str | Path], load: LoadOptions, *,
                 overwrite: bool = False, reads: Paths = (), writes: Paths = ()) -> list[Any]:
    """Check every input checkpoint (readable, not pickled unless allowed) and the output
    path against everything the command touches, before any work; returns the inputs'
    `CheckpointInfo`. Inside a command, OUT is then locked until the command ends.

    `reads` are the other files it reads (`--data`, `--eval`: none may lie inside OUT, which
    `--overwrite` deletes); `writes` the directories it writes besides OUT (`--state-dir`,
    `--cache-teacher`: none may lie inside OUT, nor inside an input, which it would change).
    """
    from undo_cli.checkpoint import check_output_path, inspect_checkpoint

    infos = [inspect_checkpoint(path, allow_pickle=load.allow_pickle, base_model=load.base_model)
             for path in inputs]
    present = [(flag, path) for flag, path in reads if path is not None and Path(path).exists()]
    written = [(flag, path) for flag, path in writes if path is not None]
    check_output_path(out, inputs=list(inputs), reads=[*present, *written],
                      overwrite=overwrite)
    bases = [info.base.path for info in infos if info.kind == "adapter"]
    for flag, path in written:
        for inp in [*inputs, *bases, *(p for _, p in present)]:
            if _inside(path, inp):
                raise UsageError(f"{flag} {path} lies inside the input {inp}, which undo must "
                                 "not change: choose a directory outside it")
    return infos


def with_bases(parents: dict[str, Any], infos: Sequence[Any]) -> dict[str, Any]:
    """`parents` (role -> checkpoint, in the order of their `CheckpointInfo`s `infos`) plus
    `ROLE_base` -> the base model of each adapter among them, so that undo.json names the
    base an adapter was merged into (--base-model)."""
    out = dict(parents)
    for (role, _), info in zip(parents.items(), infos):
        if getattr(info, "kind", None) == "adapter":
            out[f"{role}_base"] = info.base.path
    return out


def load_eval_sets(evals: EvalOptions, tokenizer, *, limit: int | None = None,
                   seed: int = 0) -> list[Any]:
    """The `--eval NAME=PATH` sets, read, validated and tokenised once."""
    if not evals.eval:
        return []
    from undo_cli.evaluate import load_eval_set

    return [load_eval_set(name, path, tokenizer, limit=limit, seed=seed,
                          choice_format=evals.choice_format)
            for name, path in evals.sets]


def check_keep_best(config: TrainConfig, sets: Sequence[Any]) -> None:
    """`--keep-best` (parsed when `config` was built) checked before any model loads: eval
    sets to measure it on, and metric names that the sets produce."""
    if not config.keep_best:
        return
    from undo_cli.evaluate import expected_metrics

    objective = config.keep_best.objective
    if not sets:
        raise UsageError("--keep-best needs --eval sets to measure (and --eval-every N to "
                         "measure during the run)")
    objective.check_names(expected_metrics(sets))
    if config.eval_every is None:
        log.info("note: --keep-best without --eval-every measures only at the end: the "
                 "last weights are written")


class Measure:
    """`measure(model)`: the flat metrics (`SET.METRIC`) of `model` on the eval sets; `items`
    holds the last call's per-item results (for bootstraps), `samples` (with `log_samples`)
    its per-item records (`--log-samples`), `eval_s` and `evaluations` the time spent and the
    calls made."""

    def __init__(self, tokenizer, sets: Sequence[Any], evals: EvalOptions, *,
                 log_samples: bool = False):
        self.tokenizer, self.sets, self.evals = tokenizer, sets, evals
        self.log_samples = log_samples
        self.items: dict[str, Any] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.eval_s = 0.0
        self.evaluations = 0

    def __call__(self, model) -> dict[str, float]:
        from undo_cli.evaluate import evaluate_model, flatten_metrics

        started = time.perf_counter()
        items: dict[str, Any] = {}
        samples: dict[str, list[dict[str, Any]]] | None = {} if self.log_samples else None
        try:
            metrics = flatten_metrics(evaluate_model(
                model, self.tokenizer, self.sets, batch_size=self.evals.eval_batch_size,
                max_new_tokens=self.evals.max_new_tokens, items=items,
                until=self.evals.until or None, samples=samples))
        finally:
            self.eval_s += time.perf_counter() - started
            self.evaluations += 1
        self.items = items
        self.samples = samples or {}
        return metrics


def measure(tokenizer, sets: Sequence[Any], evals: EvalOptions, *,
            log_samples: bool = False) -> Measure:
    """A `Measure` of `sets` with `evals`' batch size, generation length and stop strings."""
    return Measure(tokenizer, sets, evals, log_samples=log_samples)


def evaluation_hook(tokenizer, sets: Sequence[Any], evals: EvalOptions):
    """The engine's `evaluate(model, step)` on `sets`, or None without sets."""
    if not sets:
        return None
    run = measure(tokenizer, sets, evals)

    def evaluate(model, step: int) -> dict[str, float]:  # noqa: ARG001 - the engine's step
        return run(model)

    return evaluate


def select_parameters(model, pattern: str | None = None, layers: str | None = None, *,
                      pattern_flag: str = "--trainable",
                      layers_flag: str = "--train-layers") -> list[tuple[str, Any]]:
    """The (name, parameter) pairs of `model` that train: names matching `pattern`
    (re.search) and, with `layers` ("10-15", `undo_cli.layers`), inside those decoder layers;
    all when both are None. `UsageError` naming the flag for a bad pattern or range, or a
    selection that matches nothing."""
    import re

    from undo_cli.layers import resolve_layers

    named = list(model.named_parameters())
    chosen = named
    if pattern is not None:
        regex = compile_pattern(pattern_flag, pattern)
        chosen = [(n, p) for n, p in chosen if regex.search(n)]
    selection = resolve_layers(layers, [n for n, _ in named],
                               getattr(getattr(model, "config", None), "model_type", None),
                               flag=layers_flag)
    if selection is not None:
        in_layers = re.compile(selection[1])
        chosen = [(n, p) for n, p in chosen if in_layers.search(n)]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:6])
        what = " and ".join(f"{flag} {value!r}" for flag, value in
                            ((pattern_flag, pattern), (layers_flag, layers)) if value is not None)
        raise UsageError(f"{what} matches no parameter (names look like: {examples}, ...)")
    return chosen


def tokenizer_of(path: str | Path, load: LoadOptions) -> Any:
    """The tokenizer of checkpoint `path`, read as `load` says (an adapter's from its base)."""
    from undo_cli.checkpoint import load_tokenizer

    return load_tokenizer(path, trust_remote_code=load.trust_remote_code,
                          base_model=load.base_model)


def meta_model(model_config: dict[str, Any]) -> Any:
    """The model of `model_config` built on the meta device (no memory, no weights), for
    decisions taken before any weight loads; None if it cannot be built so (custom code)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**model_config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError):
        return None


def meta_trainable(model_config: dict[str, Any], select: Callable[[Any], Any]) -> int | None:
    """The parameters `select(model)` picks ((name, parameter) pairs), counted on the meta
    model of `model_config`; None if it cannot be built."""
    model = meta_model(model_config)
    return None if model is None else sum(p.numel() for _, p in select(model))


def model_parameters(model_config: dict[str, Any], meta: Any = None) -> int | None:
    """The distinct parameters of the model of `model_config` (tied weights once), counted on
    its meta model (`meta`, if the caller has built it already), else estimated from the
    config (`estimate_parameters`)."""
    from undo_cli.checkpoint.inspection import estimate_parameters

    model = meta if meta is not None else meta_model(model_config)
    if model is None:
        return estimate_parameters(model_config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def memory_plan(model_config: dict[str, Any], config: TrainConfig, *, length: int,
                streams: int = 1, batch_size: int | None = None,
                optimizers: Sequence[str] | None = None, **given: Any) -> Any:
    """The run's memory plan (`undo_cli.checkpoint.plan.plan_memory`) on the device it would
    use, under this launch's processes (FSDP shards weights, gradients and state); the
    largest over `optimizers` when several would run. None without the model's sizes."""
    from undo_cli.checkpoint.plan import plan_memory
    from undo_cli.engine import fsdp_requested, training_device, world_size
    from undo_cli.runtime import available_memory

    device = training_device(config.device)
    if device.type == "cuda":
        import torch

        available = int(torch.cuda.mem_get_info(device)[0])
    else:
        available = available_memory()
    plans = [plan_memory(dict(model_config), batch_size=batch_size or config.batch_size,
                         length=length, streams=streams, optimizer=name, bf16=config.bf16,
                         bf16_weights=config.bf16_weights,
                         gradient_checkpointing=config.gradient_checkpointing,
                         processes=world_size(), sharded=fsdp_requested(), device=str(device),
                         available=available, **given)
             for name in (optimizers or [config.optimizer])]
    return max((p for p in plans if p is not None), key=lambda p: p.total, default=None)


def plan_outcome(plan: Any, config: TrainConfig) -> dict[str, Any] | None:
    """With --dry-run, the summary that ends the command (the plan, nothing written); else
    None, after a warning if the plan does not fit the device."""
    from undo_cli.engine import is_main_process

    if config.dry_run:
        return {"dry_run": True, "plan": plan.as_dict() if plan is not None else None,
                "plan_lines": plan.lines() if plan is not None else
                ["no memory plan: the model's config does not give its sizes"],
                "is_main_process": is_main_process()}
    if plan is not None and plan.fits is False:
        log.warning("warning: the memory plan needs %.2f GB per process, more than the %.2f GB "
                    "available on %s (see --dry-run; --gradient-checkpointing, "
                    "--bf16-weights, another --optimizer or FSDP lower it)",
                    plan.total / 1e9, plan.available / 1e9, plan.device)
    return None


def check_stage(out: str | Path, inputs: Sequence[str | Path], config: TrainConfig,
                data_options: DataOptions, load: LoadOptions, *, overwrite: bool = False,
                reads: Paths = (), writes: Paths = (), optimizers: Sequence[str] | None = None,
                lr_decided_later: bool = False) -> tuple[TrainConfig, list[Any], DataOptions]:
    """The prologue every stage shares, before any work: the run made complete for `out`
    (its state directory; `validate`), its optimizers available, the inputs and OUT checked
    (`check_inputs`, with `--state-dir` and `--logging-dir` among the writes) and the row
    length decided against the first input (`fit_length`). Returns (config, the inputs'
    `CheckpointInfo`, data_options)."""
    from undo_cli.runtime import require_optimizers

    config = config.for_output(out)
    config.validate(lr_decided_later=lr_decided_later)
    require_optimizers(optimizers or [config.optimizer], config.device)
    infos = check_inputs(out, inputs, load, overwrite=overwrite, reads=reads,
                         writes=[*writes, ("--state-dir", config.state_dir),
                                 ("--logging-dir", config.logging_dir)])
    return config, infos, fit_length(data_options, infos[0].config if infos else None)


@dataclass(frozen=True)
class StagePlan:
    """Every decision of a training stage, made before any work and then final: the complete
    run (`config`: learning rate, budget, state directory), the row length, the memory plan,
    what undo.json will say (`arguments`, `parents`) and how OUT is written. A stage's
    `plan_*` function builds it from the options and the inputs' configs alone (no weight is
    loaded); `run_stage` runs it."""

    stage: str  # "train", "unlearn", "distill"
    out: Path
    inputs: tuple[str | Path, ...]  # the input checkpoints (read, never changed)
    infos: tuple[Any, ...]  # their `CheckpointInfo`
    config: TrainConfig  # complete
    data_options: DataOptions  # max_length decided
    evals: EvalOptions
    load: LoadOptions
    memory: Any  # `checkpoint.plan.MemoryPlan` or None without the model's sizes
    arguments: dict[str, Any]  # undo.json's `arguments`, as decided
    parents: dict[str, Any]  # undo.json's `parents` (adapters' bases included)
    layout: Any  # the output's dtype and shards (`checkpoint.save_layout`)
    source: str | Path | None  # the checkpoint whose support files OUT carries
    overwrite: bool = False
    keep_state: bool = False
    started: float = field(default_factory=time.time)


@dataclass
class Job:
    """What a stage trains, built by its `prepare(tokenizer, sets)` once its plan holds: the
    model, its loss and data streams, and what the stage adds to undo.json and the summary."""

    model: Any
    loss_fn: Callable
    streams: dict[str, Any]
    parameters: Any = None  # the trained parameters (None: all)
    frozen_forward_params: int = 0
    should_stop: Callable | None = None
    compute: Callable[[dict], dict] | None = None  # amends the compute record
    extra: dict[str, Any] = field(default_factory=dict)  # undo.json's extra keys
    summary: Callable[[Written], dict[str, Any]] | None = None  # the summary's own keys


def run_stage(plan: StagePlan, tokenizer: Callable[[], Any],
              prepare: Callable[[Any, list[Any]], Job], *,
              callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Run `plan`: with --dry-run its memory plan is the whole answer; else the tokenizer
    (`tokenizer()`), the eval sets (read and checked before any model loads), the stage's
    `prepare(tokenizer, sets)` (data streams first, then the models), training and OUT
    written atomically; returns the summary (`--json`)."""
    done = plan_outcome(plan.memory, plan.config)
    if done is not None:
        return done
    tok = tokenizer()
    sets = load_eval_sets(plan.evals, tok)
    check_keep_best(plan.config, sets)
    job = prepare(tok, sets)
    written = train_and_write(plan, job, tok, evaluate=evaluation_hook(tok, sets, plan.evals),
                              callbacks=callbacks)
    own = job.summary(written) if job.summary is not None else {}
    return summary(plan.out, written.result, plan.started, **own)


def arguments(train_config: TrainConfig, data_options: DataOptions, eval_options: EvalOptions,
              /, **own: Any) -> dict[str, Any]:
    """The `arguments` of a trained output's `undo.json`: the stage's own, the data layout,
    the eval sets and the training settings that shape the result."""
    return {**own, "max_length": data_options.max_length, "packing": data_options.packing,
            "eval": [list(e) for e in eval_options.sets],
            "choice_format": eval_options.choice_format,
            "train": train_config.manifest()}


def open_run_trackers(config: TrainConfig, out: str | Path, tmp: str | Path,
                      settings: dict[str, Any]):
    """The `--report-to` trackers of a run writing `out` (None without any): named
    `--run-name` (default: OUT's name), writing under `--logging-dir` (default: `runs/` in
    OUT's temporary directory `tmp`, which becomes OUT), given `settings` (undo.json's keys)."""
    if not [t for t in config.report_to if t != "none"]:
        return None
    from undo_cli.tracking import open_trackers

    logging_dir = Path(config.logging_dir) if config.logging_dir else Path(tmp) / TRACKER_DIR
    return open_trackers(config.report_to, run_name=config.run_name or Path(out).name,
                         logging_dir=logging_dir, config=settings)


def reporting(on_log: OnLog | None, trackers, prefix: str = "") -> OnLog | None:
    """`on_log` that also reports every training-log entry to `trackers` (if any)."""
    if trackers is None:
        return on_log

    def report(entry: dict[str, Any]) -> None:
        trackers.log_entry(entry, prefix)
        if on_log is not None:
            on_log(entry)

    return report


@dataclass
class Written:
    """What `train_and_write` did: the engine's result and the compute recorded."""

    result: Any
    compute: dict[str, Any] = field(default_factory=dict)


def train_and_write(plan: StagePlan, job: Job, tokenizer, *, evaluate=None,
                    callbacks: Callbacks | None = None) -> Written:
    """Train `job` with the engine and write it as `plan`'s output, atomically.

    OUT gets the model (in the plan's layout, `undo_cli.checkpoint.save_layout`), `tokenizer`,
    the source's support files, `train_log.jsonl` and `undo.json` (the plan's arguments and
    parents, seed, compute, final metrics, the data streams, the job's extra keys); the job's
    `compute(dict)` may amend the compute record (e.g. a teacher cache's FLOPs). Under a
    multi-process launch every process trains and only the main one writes. The training
    state of the plan's state directory is removed after success (unless `keep_state`).
    """
    from undo_cli.checkpoint import build_manifest, save_model, write_manifest
    from undo_cli.engine import train, training_output

    callbacks = callbacks or Callbacks()
    config, extra = plan.config, dict(job.extra)
    with training_output(plan.out, config, inputs=list(plan.inputs), overwrite=plan.overwrite,
                         keep_state=plan.keep_state) as (tmp, run_config):
        trackers = None if tmp is None else open_run_trackers(
            config, plan.out, tmp, {"stage": plan.stage, "arguments": plan.arguments,
                                    "parents": plan.parents, "seed": config.seed})
        try:
            result = train(job.model, job.loss_fn, job.streams, run_config,
                           parameters=job.parameters,
                           frozen_forward_params=job.frozen_forward_params, evaluate=evaluate,
                           should_stop=job.should_stop, on_step=callbacks.on_step,
                           on_log=reporting(callbacks.on_log, trackers))
        finally:
            if trackers is not None:
                trackers.close()
        if result.best is not None:
            extra["keep_best"] = result.best
            if tmp is not None:
                log.info("note: --keep-best: writing the weights of step %d (%s = %.6g)",
                         result.best["step"], result.best["metric"], result.best["value"])
        record = result.compute()
        if job.compute is not None:
            record = job.compute(record)
        if tmp is not None:
            save_model(result.model, tokenizer, tmp, source=plan.source, layout=plan.layout)
            write_manifest(tmp, build_manifest(
                plan.stage, arguments=plan.arguments, parents=plan.parents, seed=config.seed,
                wall_time_s=time.time() - plan.started, compute=record,
                metrics={"train": result.loss, **result.final_metrics()},
                extra={"parameters": result.parameters,
                       "data": {k: s.describe() for k, s in job.streams.items()
                                if hasattr(s, "describe")},
                       "memory_plan": plan.memory.as_dict() if plan.memory else None,
                       **extra}))
    return Written(result=result, compute=record)


def summary(out: str | Path, result: Any, started: float, **own: Any) -> dict[str, Any]:
    """The summary a training stage returns (and `--json` prints)."""
    return {"output": str(out), **own, "steps": result.steps, "tokens": result.tokens,
            "flops": result.flops["total"], "parameters": result.parameters,
            "trainable_parameters": result.trainable_parameters,
            "loss": result.loss.get("loss"), "final": result.loss,
            "stop_reason": result.stop_reason, "diverged": result.diverged,
            "diverged_step": result.diverged_step, "resumed_from": result.resumed_from,
            "metrics": result.final_metrics(), "keep_best": result.best,
            "wall_time_s": round(time.time() - started, 3),
            "is_main_process": result.is_main_process}
