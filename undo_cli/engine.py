"""The one training engine: every command that trains (train, unlearn, distill, relearn-attack)
runs its loss through `train`.

What a step is: for each of `grad_accum` micro-steps, one batch is drawn from *every* named
stream and `loss_fn(model, {name: batch, ...})` is minimised (its loss divided by
`grad_accum`); then, optionally, sharpness-aware minimisation recomputes the gradient at the
weights moved by `sam_rho * g / ||g||`; then the gradient is clipped, checked for NaN/inf and
AdamW takes a step at the scheduled learning rate.

Everything else lives here once: AdamW (no weight decay on 1-D parameters such as norms and
biases), constant / linear / cosine schedules with warmup and a floor, budgets in steps, tokens
or FLOPs, a progress bar on stderr and a JSONL log, evaluation hooks, a NaN/inf guard,
training-state checkpoints with bit-exact resume, compute accounting, CUDA + bf16 autocast, and
multi-process data parallelism through `accelerate` (`accelerate launch -m undo_cli ...`).

Compute accounting: a trained forward + backward costs 6 * P * tokens FLOPs (P = all distinct
parameters of the trained model, whether or not they are updated; doubled with SAM), a frozen
forward (a reference or teacher model) 2 * P_frozen * tokens. Tokens are the non-padding
tokens of every stream's batches, over all processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from undo_cli.errors import UndoError, UsageError
from undo_cli.jsontext import to_json

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, dict[str, Batch]], tuple[torch.Tensor, dict[str, float]]]
Evaluate = Callable[[torch.nn.Module, int], dict[str, float]]
ShouldStop = Callable[[int, dict[str, float]], "str | None"]

SCHEDULES = ("constant", "linear", "cosine")
TRAIN_LOG = "train_log.jsonl"  # the JSONL training log written into every trained output
STATE_PREFIX = "step-"
_COMPLETE = "complete.json"
# Fields that change the result: resuming with other values would not reproduce the run.
_RESUME_KEYS = ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "betas",
                "batch_size", "grad_accum", "max_grad_norm", "max_steps", "max_tokens",
                "max_flops", "seed", "sam_rho", "bf16")


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI builds it from the shared training options)."""

    lr: float = 1e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_flops: float | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    state_dir: Path | None = None
    resume: bool = False
    keep_last_finite: bool = False
    sam_rho: float = 0.0
    bf16: bool = False
    device: str | None = None
    quiet: bool = False
    log_path: Path | None = None
    eval_at_start: bool = False  # also evaluate before the first step (step 0)

    def validate(self) -> None:
        """Raise `UsageError` for impossible settings (named as the CLI options)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive (got {self.lr})")
        need(0 <= self.min_lr <= self.lr,
             f"--min-lr must lie between 0 and --lr (got {self.min_lr})")
        need(self.schedule in SCHEDULES,
             f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        need(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        need(self.weight_decay >= 0, "--weight-decay must not be negative")
        need(all(0 <= b < 1 for b in self.betas), "AdamW betas must lie in [0, 1)")
        need(self.batch_size >= 1, "--batch-size must be at least 1")
        need(self.grad_accum >= 1, "--grad-accum must be at least 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             "--max-grad-norm must be positive (0 turns clipping off)")
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        need(self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be at least 1")
        need(self.max_flops is None or self.max_flops > 0, "the FLOP budget must be positive")
        need(self.max_steps is not None or self.max_tokens is not None
             or self.max_flops is not None,
             "no training budget: give --max-steps or --max-tokens")
        need(self.log_every >= 1, "--log-every must be at least 1")
        need(self.eval_every is None or self.eval_every >= 1, "--eval-every must be at least 1")
        need(self.save_every is None or self.save_every >= 1, "--save-every must be at least 1")
        need(self.save_every is None or self.state_dir is not None,
             "--save-every needs a state directory")
        need(not self.resume or self.state_dir is not None, "--resume needs a state directory")
        need(self.sam_rho >= 0, "--sam must not be negative")


@dataclass
class TrainResult:
    """What a run did; `compute()` is what goes into the manifest."""

    steps: int
    tokens: int
    flops: dict[str, float]  # trained, frozen, total
    loss: dict[str, float]  # loss and its terms, mean over the last logged window
    evals: list[dict[str, Any]]
    stop_reason: str
    wall_time_s: float
    parameters: int  # P of the trained model (FLOPs = 6 * P * tokens)
    trainable_parameters: int
    frozen_forward_params: int = 0
    diverged: bool = False  # only with keep_last_finite: the weights are the last finite ones
    diverged_step: int | None = None
    resumed_from: int | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    is_main_process: bool = True
    num_processes: int = 1
    model: Any = None  # the trained model, unwrapped from any DDP/accelerate wrapper

    def final_metrics(self) -> dict[str, Any]:
        """The metrics of the last evaluation, without its step/tokens/flops counters."""
        last = self.evals[-1] if self.evals else {}
        return {k: v for k, v in last.items() if k not in ("step", "tokens", "flops")}

    def compute(self) -> dict[str, Any]:
        """Tokens and estimated FLOPs, for the `compute` field of `undo.json`."""
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "flops": self.flops["total"],
            "flops_trained": self.flops["trained"],
            "flops_frozen": self.flops["frozen"],
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "frozen_forward_params": self.frozen_forward_params,
            "flops_formula": "6 * parameters * tokens (trained forward+backward, x2 with SAM) "
                             "+ 2 * frozen_forward_params * tokens",
            "processes": self.num_processes,
            "stop_reason": self.stop_reason,
            "diverged_step": self.diverged_step,
        }


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps.

    Linear warmup to `lr` over `warmup_steps` steps ((step + 1) / warmup_steps * lr), then
    constant, or a linear or cosine decay that would reach `min_lr` at `total_steps`.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "linear":
        return config.lr - (config.lr - config.min_lr) * progress
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(stream: str = "train") -> LossFn:
    """The plain language-model loss: mean cross-entropy on `stream`'s labelled tokens."""

    def loss_fn(model: torch.nn.Module, batches: dict[str, Batch]):
        return model(**batches[stream]).loss, {}

    return loss_fn


# --------------------------------------------------------------------------- processes


def world_size() -> int:
    """Processes of the launch (`accelerate launch` / `torchrun` set WORLD_SIZE; 1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True when launched by `accelerate launch` / `torchrun` with more than one process."""
    return world_size() > 1


def fsdp_requested() -> bool:
    """True when the launcher was given an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _process_state():
    """accelerate's process state; on a machine without CUDA, processes talk over gloo."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if cpu and is_distributed() and state.num_processes == 1:
        # A `PartialState()` made earlier without cpu=True fell back to a single process on
        # this CUDA-less machine (no process group was created): set it up again over gloo.
        PartialState._reset_state()
        state = PartialState(cpu=True)
    return state


def is_main_process() -> bool:
    """True on the process that writes outputs (always, without a multi-process launch)."""
    return _process_state().is_main_process if is_distributed() else True


def training_device(config: TrainConfig) -> torch.device:
    """The device `train` uses: the launcher's (one GPU per process) under a multi-process
    launch, else `config.device` (`auto`: CUDA if present)."""
    from undo_cli.runtime import pick_device

    return _process_state().device if is_distributed() else pick_device(config.device)


def wait_for_everyone() -> None:
    """A barrier across processes (no-op in a single process)."""
    if is_distributed():
        _process_state().wait_for_everyone()


def _make_accelerator(config: TrainConfig):
    import logging

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from undo_cli.runtime import pick_device

    # accelerate logs notes such as "Removed shared tensor ... while saving" (tied weights).
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if not is_distributed():
        device = pick_device(config.device)
        cpu = device.type == "cpu"
        if cpu and PartialState._shared_state and PartialState().device.type != "cpu":
            # An earlier run in this process set accelerate up for a GPU.
            AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=cpu, device_placement=False), device
    # Under a multi-process launch the launcher decides the devices: CUDA if present.
    _process_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    _fsdp_on_cpu(accelerator)
    return accelerator, accelerator.device


def _fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP2 config (`accelerate launch --config_file examples/accelerate/fsdp.yaml`)
    on a machine without CUDA. accelerate turns FSDP on only for GPU-like process groups
    (AcceleratorState: `distributed_type in [MULTI_GPU, ...]`); over gloo (MULTI_CPU) it drops
    the plugin and silently runs DDP. torch's FSDP2 (`fully_shard`) works on a CPU device mesh
    over gloo, so do here what accelerate does on GPUs: keep the plugin and mark the (shared)
    state FSDP. This is what lets the FSDP path run in the CPU tests (tests/test_fsdp.py)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        return  # FSDP1 on the CPU is not supported here: accelerate's DDP fallback stays
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    # Both: a later AcceleratorState() copies PartialState's fields over its own.
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


@contextmanager
def training_output(out: str | Path, config: TrainConfig, *, inputs=(), overwrite: bool = False,
                    keep_state: bool = False) -> Iterator[tuple[Path | None, TrainConfig]]:
    """The output of a command that trains: `(directory, run_config)`.

    On the main process `directory` is the temporary directory of `atomic_output(out)` and
    `run_config` logs to `directory/train_log.jsonl`; other processes get `(None, config)`
    and write nothing. After the block succeeds every process waits for the others, and the
    training state in `config.state_dir` is removed (unless `keep_state`); on failure the
    state stays, for `--resume`.
    """
    from undo_cli.checkpoint import atomic_output

    main = is_main_process()
    output = atomic_output(out, inputs=inputs, overwrite=overwrite) if main else nullcontext()
    with output as tmp:
        log = Path(tmp) / TRAIN_LOG if tmp is not None else None
        yield tmp, replace(config, log_path=log)
    wait_for_everyone()
    if not keep_state:
        remove_state(config.state_dir)


# --------------------------------------------------------------------------- state


class _RunState:
    """Counters and histories saved with the training state (registered with accelerate)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.flops_trained = 0.0
        self.flops_frozen = 0.0
        self.log: list[dict] = []
        self.evals: list[dict] = []
        self.streams: dict[str, dict] = {}
        self.elapsed_s = 0.0
        self.config: dict = {}
        self.window: dict = {}  # the unfinished log window (so resumed logs match)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _resume_key(config: TrainConfig, streams: dict, world: int) -> dict:
    key = {k: getattr(config, k) for k in _RESUME_KEYS}
    key["betas"] = list(config.betas)
    key["streams"] = sorted(streams)
    key["processes"] = world
    return key


def latest_state(state_dir: str | Path) -> Path | None:
    """The newest complete training-state directory under `state_dir`, or None."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None
    found = [p for p in state_dir.iterdir()
             if p.name.startswith(STATE_PREFIX) and (p / _COMPLETE).is_file()]
    return max(found, key=lambda p: int(p.name[len(STATE_PREFIX):]), default=None)


def remove_state(state_dir: str | Path | None) -> None:
    """Delete the saved training states in `state_dir` (after the run's output was written),
    and the directory itself if nothing else is in it. Other files are never touched."""
    if state_dir is None or not is_main_process():
        return
    state_dir = Path(state_dir)
    _clear_states(state_dir)
    with suppress(OSError):
        state_dir.rmdir()


def _clear_states(state_dir: Path, keep: Path | None = None) -> None:
    if not state_dir.is_dir():
        return
    for p in state_dir.iterdir():
        if p != keep and (p.name.startswith(STATE_PREFIX) or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)


def _save_state(accelerator, state_dir: Path, step: int, key: dict) -> None:
    """Write the state into a temporary directory, then rename it: never a half-written one."""
    final = state_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = state_dir / f".tmp-{STATE_PREFIX}{step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / _COMPLETE).write_text(json.dumps({"step": step, "config": key}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _clear_states(state_dir, keep=final)
        accelerator.wait_for_everyone()
    except BaseException:  # e.g. a full disk: leave no half-written state behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with suppress(OSError):
                state_dir.rmdir()  # only if no earlier state is in it
        raise


# --------------------------------------------------------------------------- display


class _Display:
    """A rich progress bar on a terminal, plain lines at each logged step otherwise."""

    def __init__(self, enabled: bool, total: float, unit: str):
        from undo_cli.cli.common import err_console

        self.console = err_console
        self.enabled = enabled
        self.unit = unit
        self.total = total
        self.progress = None
        if enabled and err_console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=err_console, transient=False,
            )
            self.task = self.progress.add_task(unit, total=total, status="")
            self.progress.start()

    def advance(self, completed: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed)

    def status(self, entry: dict) -> None:
        if not self.enabled:
            return
        parts = [f"loss {entry['loss']:.4g}"]
        parts += [f"{k} {v:.4g}" for k, v in entry.items()
                  if k not in _NOT_TERMS and k != "loss" and isinstance(v, float)]
        parts += [f"lr {entry['lr']:.2e}", f"{entry['tokens_per_s']:,.0f} tok/s"]
        text = " · ".join(parts)
        if self.progress is not None:
            self.progress.update(self.task, status=text)
        else:
            self.console.print(f"step {entry['step']}: {text}", markup=False, highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# --------------------------------------------------------------------------- training


def _planned_steps(config: TrainConfig, streams: dict, flops_per_token: float) -> int | None:
    """Steps the run will take (for the schedule and the progress bar), or None if unknown."""
    plans = [config.max_steps] if config.max_steps else []
    if config.max_tokens or config.max_flops:
        try:
            per_step = sum(s.tokens_per_batch() for s in streams.values()) * config.grad_accum
        except AttributeError:
            per_step = None
        if per_step:
            if config.max_tokens:
                plans.append(math.ceil(config.max_tokens / per_step))
            if config.max_flops:
                plans.append(math.ceil(config.max_flops / (per_step * flops_per_token)))
    return min(plans) if plans else None


def _all_finite(params: list[torch.Tensor]) -> bool:
    """True if every parameter is finite. Sharded (FSDP2 DTensor) parameters are checked
    shard by shard and the verdict is agreed by all processes."""
    sharded = any(hasattr(p, "to_local") for p in params)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    finite = torch.stack([torch.isfinite(p).all() for p in local]).all()
    if sharded and is_distributed():
        import torch.distributed as dist

        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return float(value)


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    streams: dict[str, Iterator[Batch]],
    config: TrainConfig,
    *,
    parameters: list[torch.nn.Parameter] | None = None,
    frozen_forward_params: int = 0,
    evaluate: Evaluate | None = None,
    should_stop: ShouldStop | None = None,
) -> TrainResult:
    """Train `model` in place to minimise `loss_fn` on batches from `streams`.

    `streams` maps names to endless batch iterators (`undo_cli.data.BatchStream`); every
    micro-step draws one batch from each and calls `loss_fn(model, {name: batch})`, which
    returns the scalar loss to minimise and a dict of named terms for the logs (floats or
    0-dim tensors: tensors avoid a device sync). `parameters` (default: every parameter that
    requires grad) are optimised; the model's other parameters are frozen for the run.
    `evaluate(model, step)` runs every `eval_every` steps and at the end (model in eval mode,
    under no_grad); after each evaluation `should_stop(step, metrics)` may end the run by
    returning a reason. `frozen_forward_params` counts the parameters of frozen models that
    run forward over every step's tokens (for FLOP accounting).

    Raises `UndoError` if the run diverges (NaN/inf loss, gradient or weights), unless
    `keep_last_finite`: then the last finite weights are kept and the result is marked
    `diverged`. The model is trained in place; `result.model` is it, unwrapped.
    """
    config.validate()
    if not streams:
        raise UsageError("training needs at least one data stream")
    trainer = _Trainer(model, loss_fn, streams, config, parameters, frozen_forward_params,
                       evaluate, should_stop)
    try:
        return trainer.run()
    finally:
        trainer.close()


class _Trainer:
    """One call of `train`: set-up, the step loop, logging, evaluation, state, result."""

    def __init__(self, model, loss_fn, streams, config, parameters, frozen_forward_params,
                 evaluate, should_stop):
        self.started = time.perf_counter()
        self.model, self.loss_fn, self.streams, self.config = model, loss_fn, streams, config
        self.evaluate, self.should_stop = evaluate, should_stop
        self.frozen_forward_params = frozen_forward_params
        self.accelerator, self.device = _make_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.show = self.main and not config.quiet
        for stream in streams.values():
            if hasattr(stream, "shard"):
                stream.shard(self.accelerator.process_index, self.world)

        self.all_params = parameters is None
        if parameters is None:
            parameters = [p for p in model.parameters() if p.requires_grad]
        self.params = list({id(p): p for p in parameters}.values())
        if not self.params:
            raise UsageError("nothing to train: no parameter requires a gradient")
        chosen = {id(p) for p in self.params}
        self.frozen_now = [p for p in model.parameters()
                           if p.requires_grad and id(p) not in chosen]
        for p in self.frozen_now:
            p.requires_grad_(False)
        self.was_training = model.training
        self.cache_setting = getattr(getattr(model, "config", None), "use_cache", None)
        if self.cache_setting is not None:
            model.config.use_cache = False  # no KV cache while training

        self.n_params = _count_parameters(model)
        self.n_trainable = sum(p.numel() for p in self.params)
        self.flops_per_token = 6.0 * self.n_params * (2 if config.sam_rho > 0 else 1)
        self.frozen_per_token = 2.0 * frozen_forward_params
        self.display: _Display | None = None
        self.log_file = None
        self.shadow: list[torch.Tensor] | None = None
        self.diverged_step: int | None = None
        self.resumed_from: int | None = None

    # ---------------------------------------------------------------- set-up

    def _setup(self) -> None:
        config, accelerator = self.config, self.accelerator
        if not is_distributed():
            self.model.to(self.device)
        self.model.train()
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), **fused)
        names = {id(p): n for n, p in self.model.named_parameters()}
        chosen = [names.get(id(p)) for p in self.params]
        self.prepared, self.optimizer = accelerator.prepare(self.model, optimizer)
        # FSDP2 replaces the parameters by sharded ones (DTensors) of the same names, in place:
        # clipping, the NaN/inf checks and --keep-last-finite must see those, for a subset of
        # the parameters (unlearn, --trainable) too. DDP keeps them: the same objects come back.
        now = dict(self.model.named_parameters())
        if all(n in now for n in chosen):
            self.params = [now[n] for n in chosen]
        elif self.all_params:  # another wrapper renamed them (FSDP1): all that require grad
            self.params = list({id(p): p for p in self.prepared.parameters()
                                if p.requires_grad}.values())
        self.unwrapped = accelerator.unwrap_model(self.prepared)
        self.run_state = _RunState()
        accelerator.register_for_checkpointing(self.run_state)
        self._resume_or_seed()
        self.total_steps = _planned_steps(config, self.streams, self.flops_per_token)
        if self.total_steps is None and config.schedule != "constant":
            raise UsageError(f"--schedule {config.schedule} needs a known length: give "
                             "--max-steps")
        self.autocast = nullcontext
        if config.bf16:
            if self.device.type == "cuda":
                self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
            else:
                self._note("note: --bf16 applies on CUDA only; training in fp32 on the CPU")
        if self.main and config.log_path is not None:
            Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(config.log_path, "w", encoding="utf-8")  # noqa: SIM115
            for entry in self.run_state.log:
                self.log_file.write(to_json(entry) + "\n")
            self.log_file.flush()
        if config.max_steps is not None or self.total_steps is not None:
            self.unit, goal = "step", float(self.total_steps or config.max_steps)
        else:
            self.unit, goal = "token", float(config.max_tokens or 0)
        self.display = _Display(self.show, goal, self.unit)
        self._advance()
        if self.resumed_from is not None:
            self.display.message(f"resumed from step {self.resumed_from}")
        self.elapsed_before = self.run_state.elapsed_s
        self.window = _Window()
        self.window.load(self.run_state.window)

    def _resume_or_seed(self) -> None:
        config, run = self.config, self.run_state
        key = _resume_key(config, self.streams, self.world)
        state_dir = Path(config.state_dir) if config.state_dir is not None else None
        saved = latest_state(state_dir) if (config.resume and state_dir) else None
        if config.resume and saved is None:
            self._note(f"--resume: no saved training state in {state_dir}; starting at step 0")
        if saved is not None:
            before = json.loads((saved / _COMPLETE).read_text()).get("config", {})
            diffs = [f"{k}={before.get(k)!r} (now {v!r})" for k, v in key.items()
                     if before.get(k) != v]
            if diffs:  # checked before anything is loaded into the model
                raise UsageError(f"--resume: the state in {saved} was saved with other "
                                 f"settings: {', '.join(diffs)}; resume with the same settings "
                                 "or start afresh without --resume")
            self.accelerator.load_state(str(saved))
            for name, stream in self.streams.items():
                if name in run.streams and hasattr(stream, "load_state_dict"):
                    stream.load_state_dict(run.streams[name])
            self.resumed_from = run.step
        else:
            from undo_cli.runtime import seed_everything

            seed_everything(config.seed)
            run.config = key
            if state_dir is not None and self.main and config.save_every:
                _clear_states(state_dir)  # states of an earlier run must not be resumed
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        self._setup()
        run, config = self.run_state, self.config
        stop = self._budget_reason()
        if self.evaluate is not None and config.eval_at_start and run.step == 0:
            stop = self._evaluate()[1] or stop
        while stop is None:
            lr = lr_at(run.step, config, self.total_steps or 1)
            if not self._step(lr):
                stop = self._diverged(run.step + 1, self._why)
                break
            stop = self._budget_reason()
            if stop and not _all_finite(self.params):
                stop = self._diverged(run.step, "the weights are not finite")
                break
            evaluated = None
            if self.evaluate is not None and (
                    stop or (config.eval_every and run.step % config.eval_every == 0)):
                evaluated, reason = self._evaluate(write=False)
                stop = reason or stop
            if stop or run.step % config.log_every == 0:
                self._log(lr)
            if evaluated is not None:
                self._write(evaluated)
            if config.save_every and run.step % config.save_every == 0 and not stop:
                self._save()
        if self.diverged_step is None and not _all_finite(self.params):
            stop = self._diverged(run.step, "the weights are not finite")
        if self.diverged_step is not None:
            self._log(lr_at(max(run.step - 1, 0), config, self.total_steps or 1))
            self._write({"type": "diverged", "step": self.diverged_step, "reason": stop})
            self.display.message(f"warning: {stop}; keeping the last finite weights "
                                 "(--keep-last-finite)")
            if self.evaluate is not None:
                self._evaluate()
        return self._result(stop)

    def _step(self, lr: float) -> bool:
        """One optimizer step; False (and nothing applied) if the loss or gradient is not finite."""
        config, accelerator = self.config, self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [{name: next(stream) for name, stream in self.streams.items()}
                 for _ in range(config.grad_accum)]
        tokens = sum(self._tokens(name, batches[name])
                     for batches in micro for name in self.streams)
        micro = [{name: {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
                  for name, b in batches.items()} for batches in micro]

        loss_sum, terms = self._forward_backward(micro, record=True)
        if config.sam_rho > 0:
            self._sharpness_aware(micro)
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        grad_norm = accelerator.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor; make it a plain one
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss_sum)
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        if self.world > 1:
            finite = accelerator.reduce(finite.to(self.device, torch.float32), "sum") >= self.world
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            self._why = f"the loss is {float(loss_sum) / config.grad_accum:.4g}"
            if grad_norm is not None and not torch.isfinite(grad_norm):
                self._why += f" and the gradient norm is {float(grad_norm):.4g}"
            return False
        if config.keep_last_finite:  # the weights before this update, known to be finite
            if self.shadow is None:
                self.shadow = [p.detach().clone() for p in self.params]
            else:
                torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        run = self.run_state
        run.step += 1
        run.tokens += tokens
        run.flops_trained += self.flops_per_token * tokens
        run.flops_frozen += self.frozen_per_token * tokens
        self.window.add(loss_sum / config.grad_accum,
                        {k: v / config.grad_accum for k, v in terms.items()}, grad_norm, tokens)
        self._advance()
        return True

    def _tokens(self, name: str, batch: Batch) -> int:
        """Non-padding tokens of this micro-batch over all processes."""
        n = getattr(self.streams[name], "last_tokens", None)
        if n is None:
            n = int(batch["attention_mask"].sum()) * self.world
        return n

    def _forward_backward(self, micro: list[dict[str, Batch]], record: bool):
        """Accumulate gradients over the micro-batches (gradient sync on the last only)."""
        total, terms = None, {}
        for i, batches in enumerate(micro):
            last = i == len(micro) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.prepared):
                with self.autocast():
                    loss, parts = self.loss_fn(self.prepared, batches)
                self.accelerator.backward(loss / self.config.grad_accum)
            if record:
                value = loss.detach().float()
                total = value if total is None else total + value
                for k, v in parts.items():
                    terms[k] = terms.get(k, 0.0) + _to_number(v)
        return total, terms

    def _sharpness_aware(self, micro: list[dict[str, Batch]]) -> None:
        """SAM: replace the gradient by the one at w + rho * g / ||g||, then restore w."""
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = self.config.sam_rho / (norm + 1e-12)
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_add_(params, [g * scale.to(g.dtype) for g in grads])
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward(micro, record=False)
        with torch.no_grad():
            torch._foreach_copy_(params, originals)  # exact restore (no w + e - e rounding)

    # ---------------------------------------------------------------- hooks

    def _budget_reason(self) -> str | None:
        config, run = self.config, self.run_state
        if config.max_steps is not None and run.step >= config.max_steps:
            return "max_steps"
        if config.max_tokens is not None and run.tokens >= config.max_tokens:
            return "max_tokens"
        flops = run.flops_trained + run.flops_frozen
        if config.max_flops is not None and flops >= config.max_flops:
            return "max_flops"
        return None

    def _evaluate(self, write: bool = True) -> tuple[dict, str | None]:
        """Run the evaluation hook: (its log entry, should_stop's reason, the same on every
        process). The entry is written to the log unless `write` is False."""
        run = self.run_state
        self.prepared.eval()
        with torch.no_grad():
            metrics = dict(self.evaluate(self.unwrapped, run.step))
        self.prepared.train()
        entry = {"step": run.step, "tokens": run.tokens,
                 "flops": run.flops_trained + run.flops_frozen, **metrics}
        run.evals.append(entry)
        entry = {"type": "eval", **entry}
        if write:
            self._write(entry)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        self.display.message(f"eval @ step {run.step}: {shown}")
        if self.should_stop is None or self.diverged_step is not None:
            return entry, None
        reason = self.should_stop(run.step, metrics)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [reason]
            broadcast_object_list(box, from_process=0)
            reason = box[0]
        return entry, reason

    def _log(self, lr: float) -> None:
        entry = self.window.entry(self.accelerator, self.device)
        if entry is None:
            return
        run = self.run_state
        now = time.perf_counter()
        entry = {"type": "train", "step": run.step, **entry, "lr": lr, "tokens": run.tokens,
                 "flops": run.flops_trained + run.flops_frozen,
                 "elapsed_s": self.elapsed_before + now - self.started}
        self._write(entry)
        self.display.status(entry)

    def _write(self, entry: dict) -> None:
        self.run_state.log.append(entry)
        if self.log_file is not None:
            self.log_file.write(to_json(entry) + "\n")
            self.log_file.flush()

    def _save(self) -> None:
        run = self.run_state
        run.elapsed_s = self.elapsed_before + time.perf_counter() - self.started
        run.streams = {n: s.state_dict() for n, s in self.streams.items()
                       if hasattr(s, "state_dict")}
        run.window = self.window.state()
        _save_state(self.accelerator, Path(self.config.state_dir), run.step, run.config)

    def _advance(self) -> None:
        run = self.run_state
        self.display.advance(run.step if self.unit == "step" else run.tokens)

    def _note(self, text: str) -> None:
        if self.show:
            from undo_cli.cli.common import info

            info(text)

    def _diverged(self, step: int, what: str) -> str:
        """Stop a diverging run: raise, or (keep_last_finite) restore the last finite weights."""
        reason = f"training diverged at step {step}: {what}"
        if not self.config.keep_last_finite:
            raise UndoError(f"{reason}; nothing was written. Lower --lr (or add --warmup-steps "
                            "or --max-grad-norm), or pass --keep-last-finite to keep the last "
                            "finite weights")
        if not _all_finite(self.params):
            if self.shadow is None or not _all_finite(self.shadow):
                raise UndoError(f"{reason}, and no finite weights are left to keep; nothing "
                                "was written. Lower --lr")
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.shadow)
        self.diverged_step = step
        return reason

    # ---------------------------------------------------------------- the end

    def _result(self, stop: str) -> TrainResult:
        run = self.run_state
        if self.log_file is not None:
            self.log_file.close()
        last = next((e for e in reversed(run.log) if e.get("type") == "train"), {})
        loss = {k: v for k, v in last.items() if isinstance(v, float) and k not in _NOT_TERMS}
        wall = self.elapsed_before + time.perf_counter() - self.started
        self.accelerator.wait_for_everyone()
        model = self._full_model(
            self.accelerator.unwrap_model(self.prepared, keep_fp32_wrapper=False))
        return TrainResult(
            steps=run.step, tokens=run.tokens,
            flops={"trained": run.flops_trained, "frozen": run.flops_frozen,
                   "total": run.flops_trained + run.flops_frozen},
            loss=loss, evals=list(run.evals), stop_reason=stop, wall_time_s=wall,
            parameters=self.n_params, trainable_parameters=self.n_trainable,
            frozen_forward_params=self.frozen_forward_params,
            diverged=self.diverged_step is not None, diverged_step=self.diverged_step,
            resumed_from=self.resumed_from, log=list(run.log), is_main_process=self.main,
            num_processes=self.world, model=model,
        )

    def _full_model(self, model):
        """Under FSDP or DeepSpeed ZeRO-3 every process holds a shard of the weights: gather
        them (all processes take part) into a plain copy of the model on the main process,
        which is what the commands save. Without sharding, `model` itself."""
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        kind = accelerator.distributed_type
        zero3 = kind == DistributedType.DEEPSPEED and (
            accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)
        if kind != DistributedType.FSDP and not zero3:
            return model
        state = accelerator.get_state_dict(self.prepared)  # full, on the main process
        if not self.main:
            return model
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_config(model.config)
        missing, _ = full.load_state_dict(state, strict=False)
        full.tie_weights()
        own = full.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        lost = [k for k in missing if own[k].data_ptr() not in loaded]  # tied ones are shared
        if lost:
            raise UndoError(f"gathering the sharded weights lost {lost[:5]}; nothing was written")
        return full

    def close(self) -> None:
        """Undo the run's temporary changes to the model; release accelerate's references."""
        for p in self.frozen_now:
            p.requires_grad_(True)
        if self.cache_setting is not None:
            self.model.config.use_cache = self.cache_setting
        self.model.train(self.was_training)
        if self.display is not None:
            self.display.close()
        if self.log_file is not None and not self.log_file.closed:
            self.log_file.close()
        self.shadow = None
        self.accelerator.free_memory()


class _Window:
    """Sums over the steps since the last log line (kept on the device: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.tokens, self.loss, self.grad_norm = 0, 0, 0.0, 0.0
        self.terms: dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def add(self, loss, terms: dict, grad_norm, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.loss = self.loss + loss
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        if grad_norm is not None:
            self.grad_norm = self.grad_norm + grad_norm.detach().float()

    def state(self) -> dict:
        """The sums as plain numbers, for the saved training state."""
        def num(v):
            return float(v) if isinstance(v, torch.Tensor) else v

        return {"steps": self.steps, "tokens": self.tokens, "loss": num(self.loss),
                "grad_norm": num(self.grad_norm),
                "terms": {k: num(v) for k, v in self.terms.items()}}

    def load(self, state: dict) -> None:
        if state:
            self.steps, self.tokens = state["steps"], state["tokens"]
            self.loss, self.grad_norm = state["loss"], state["grad_norm"]
            self.terms = dict(state["terms"])

    def entry(self, accelerator, device: torch.device) -> dict | None:
        """Means over the window (averaged over processes), then start a new window."""
        if self.steps == 0:
            return None
        values = {"loss": self.loss, "grad_norm": self.grad_norm, **{
            k: v for k, v in self.terms.items() if k not in _NOT_TERMS and k != "loss"}}
        names = list(values)
        packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(())
                              .to(device) for k in names])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, "mean")
        means = dict(zip(names, (v / self.steps for v in packed.tolist()), strict=True))
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        entry = {"loss": means.pop("loss"), **{k: means[k] for k in names[2:]},
                 "grad_norm": means["grad_norm"], "tokens_per_s": self.tokens / seconds}
        self.reset()
        return entry


_NOT_TERMS = {"type", "step", "lr", "grad_norm", "tokens", "flops", "tokens_per_s", "elapsed_s"}

__all__ = [
    "Batch", "LossFn", "TrainConfig", "TrainResult", "fsdp_requested", "is_distributed",
    "is_main_process",
    "latest_state", "lm_loss", "lr_at", "remove_state", "train", "training_device",
    "wait_for_everyone", "world_size",
]
