"""The training loop: `train(model, loss_fn, streams, config)`, read top to bottom.

What a step is: for each of `grad_accum` micro-steps, one batch is drawn from *every* named
stream and `loss_fn(model, {name: batch, ...})` is minimised (its loss divided by
`grad_accum`); then, optionally, sharpness-aware minimisation recomputes the gradient at the
weights moved by `sam_rho * g / ||g||`; then the gradient is clipped, checked for NaN/inf and
the optimizer (`--optimizer`, AdamW by default) takes a step at the scheduled learning rate.

Compute accounting (`flops_per_token`): a trained step costs, per token,

    2 * P              the forward pass through the whole model (P: distinct parameters)
  + 2 * P_backward     the backward pass's gradients with respect to the activations, from
                       the loss down to the lowest trained parameter (P_backward: the
                       parameters from the first trained one on, in the model's order, which is
                       the forward order of transformers' decoders, plus the output head)
  + 2 * P_trained      the gradients with respect to the trained weights themselves

so 6 * P when everything trains, and less when only some parameters do (frozen layers below
the lowest trained one need no backward at all; frozen layers above it pass gradients on but
compute none for their weights). P_backward is an upper bound when the loss does not depend on
the layers above the trained ones (RMU's hidden-state loss). Doubled with SAM (two forward and
backward passes). A frozen forward (a reference or teacher model) costs 2 * P_frozen * tokens.
Tokens are the non-padding tokens of every stream's batches, over all processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, broadcast_object_list

from undo_cli.data import fit_packing, model_inputs
from undo_cli.engine.memory import prepare_model
from undo_cli.engine.processes import (
    all_finite,
    gather_full_model,
    is_distributed,
    make_accelerator,
)
from undo_cli.engine.result import NOT_TERMS, LogWindow, TrainResult
from undo_cli.engine.schedule import lr_at, make_optimizer, planned_steps
from undo_cli.engine.state import (
    RunState,
    check_state_dir,
    clear_states,
    latest_state,
    resume_key,
    save_state,
    saved_key,
)
from undo_cli.engine.state_files import check_files, restore
from undo_cli.errors import UndoError, UsageError
from undo_cli.jsontext import to_json
from undo_cli.losses import IGNORE_INDEX, token_cross_entropy
from undo_cli.options import TrainConfig
from undo_cli.runtime import seed_everything

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, dict[str, Batch]], tuple[torch.Tensor, dict[str, float]]]
Evaluate = Callable[[torch.nn.Module, int], dict[str, float]]
ShouldStop = Callable[[int, dict[str, float]], "str | None"]
OnStep = Callable[[int, "int | None", int], None]  # (step, planned steps or None, tokens)
OnLog = Callable[[dict[str, Any]], None]  # every entry of the training log, as written


def lm_loss(stream: str = "train") -> LossFn:
    """The plain language-model loss: mean cross-entropy on `stream`'s labelled tokens."""

    def loss_fn(model: torch.nn.Module, batches: dict[str, Batch]):
        batch = batches[stream]
        logits = model(**model_inputs(batch)).logits
        return token_cross_entropy(logits, batch["labels"], batch.get("num_targets")), {}

    return loss_fn


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def backward_parameters(model: torch.nn.Module, trained: list[torch.nn.Parameter]) -> int:
    """P_backward of the module docstring: the distinct parameters from the first trained one
    on (in `model.parameters()` order), plus the output head's weight if it comes before
    (tied to the input embedding); P when the first parameter trains."""
    chosen = {id(p) for p in trained}
    ordered = list({id(p): p for p in model.parameters()}.values())
    first = next((i for i, p in enumerate(ordered) if id(p) in chosen), len(ordered))
    after = ordered[first:]
    total = sum(p.numel() for p in after)
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.nn.Parameter) and all(weight is not p for p in after):
        total += weight.numel()
    return total


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
    on_step: OnStep | None = None,
    on_log: OnLog | None = None,
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

    Progress is reported on the main process only: `on_step(step, planned_steps, tokens)` after
    every optimizer step (once at the start with the step reached, 0 or the resumed step) and
    `on_log(entry)` with every entry written to the training log (`type` "train", "eval",
    "diverged"); notes go to the `logging` module.

    Raises `UndoError` if the run diverges (NaN/inf loss, gradient or weights), unless
    `keep_last_finite`: then the last finite weights are kept and the result is marked
    `diverged`. The model is trained in place; `result.model` is it, unwrapped.
    """
    config.validate()
    if not streams:
        raise UsageError("training needs at least one data stream")
    if config.keep_best and evaluate is None:
        raise UsageError("--keep-best needs evaluations: give --eval NAME=PATH (and "
                         "--eval-every N)")
    trainer = _Trainer(model, loss_fn, streams, config, parameters, frozen_forward_params,
                       evaluate, should_stop, on_step, on_log)
    try:
        return trainer.run()
    finally:
        trainer.close()


class _Trainer:
    """One call of `train`: set-up, the step loop, logging, evaluation, state, result."""

    def __init__(self, model, loss_fn, streams, config, parameters, frozen_forward_params,
                 evaluate, should_stop, on_step, on_log):
        self.started = time.perf_counter()
        self.model, self.loss_fn, self.streams, self.config = model, loss_fn, streams, config
        self.evaluate, self.should_stop = evaluate, should_stop
        self.objective = config.keep_best.objective if config.keep_best else None
        self.frozen_forward_params = frozen_forward_params
        self.accelerator, self.device = make_accelerator(config.device)
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.on_step = on_step if self.main else None
        self.on_log = on_log if self.main else None
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

        self.n_params = count_parameters(model)
        self.n_trainable = sum(p.numel() for p in self.params)
        self.n_backward = backward_parameters(model, self.params)
        self.flops_per_token = (2.0 * self.n_params + 2.0 * self.n_backward
                                + 2.0 * self.n_trainable) * (2 if config.sam_rho > 0 else 1)
        self.frozen_per_token = 2.0 * frozen_forward_params
        self.log_file = None
        self.restore_model = None
        self.shadow: list[torch.Tensor] | None = None
        self.diverged_step: int | None = None
        self.resumed_from: int | None = None

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
            if stop and not all_finite(self.params):
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
        if self.diverged_step is None and not all_finite(self.params):
            stop = self._diverged(run.step, "the weights are not finite")
        if self.diverged_step is not None:
            self._log(lr_at(max(run.step - 1, 0), config, self.total_steps or 1))
            self._write({"type": "diverged", "step": self.diverged_step, "reason": stop})
            if self.main:
                log.warning("warning: %s; keeping the last finite weights "
                            "(--keep-last-finite)", stop)
            if self.evaluate is not None:
                self._evaluate()
        return self._result(stop)

    def _step(self, lr: float) -> bool:
        """One optimizer step; False (and nothing applied) if the loss or gradient is not finite."""
        config, accelerator = self.config, self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro, tokens, targets = [], 0, {name: 0 for name in self.streams}
        for _ in range(config.grad_accum):
            batches = {}
            for name, stream in self.streams.items():
                batches[name] = batch = next(stream)
                tokens += self._count(stream, "last_tokens", batch["attention_mask"])
                targets[name] += self._count(stream, "last_targets",
                                             batch["labels"][:, 1:] != IGNORE_INDEX)
            micro.append(batches)
        # Token-mean losses divide by `num_targets` (undo_cli.losses): the stream's predicted
        # tokens over the whole step per micro-batch and process, so the step weighs every
        # token of the global batch the same, whatever the accumulation and the processes.
        for batches in micro:
            for name, batch in batches.items():
                batch["num_targets"] = torch.tensor(
                    targets[name] / (config.grad_accum * self.world))
        micro = [{name: {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
                  for name, b in batches.items()} for batches in micro]

        loss_sum, terms = self._forward_backward(micro, record=True)
        if config.sam_rho > 0:
            self._sharpness_aware(micro)
        max_norm = config.max_grad_norm or math.inf  # 0 or None: no clipping
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
        self._report_step()
        return True

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

    # ---------------------------------------------------------------- set-up

    def _setup(self) -> None:
        config, accelerator = self.config, self.accelerator
        if not is_distributed():
            self.model.to(self.device)

        fit_packing(self.streams, [self.model])
        self.model.train()
        self.restore_model = prepare_model(self.model, config)  # bf16 weights, checkpointing
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        optimizer = make_optimizer(groups, config, self.device)
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
        self.sharded = any(hasattr(p, "to_local") for p in self.params)  # FSDP2 DTensors
        self.run_state = RunState()
        self._resume_or_seed()
        self.total_steps = planned_steps(config, self.streams, self.flops_per_token)
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
        self._report_step()
        if self.resumed_from is not None:
            self._note(f"resumed from step {self.resumed_from}")
        self.elapsed_before = self.run_state.elapsed_s
        self.window = LogWindow()
        self.window.load(self.run_state.window)

    def _resume_or_seed(self) -> None:
        config, run = self.config, self.run_state
        key = resume_key(config, self.streams, self.world)
        state_dir = Path(config.state_dir) if config.state_dir is not None else None
        if state_dir is not None and (config.resume or config.save_every):
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                raise UsageError("--save-every / --resume are not available under DeepSpeed "
                                 "(its state is pickled); use DDP or FSDP")
            check_state_dir(state_dir)
        saved = latest_state(state_dir) if (config.resume and state_dir) else None
        if config.resume and saved is None:
            self._note(f"--resume: no saved training state in {state_dir}; starting at step 0")
        if saved is not None:
            check_files(saved, self.world)  # nothing but undo's own files, before any read
            before = saved_key(saved)
            diffs = [f"{k}={before.get(k)!r} (now {v!r})" for k, v in key.items()
                     if before.get(k) != json.loads(json.dumps(v))]
            if diffs:  # checked before anything is loaded into the model
                raise UsageError(f"--resume: the state in {saved} was saved with other "
                                 f"settings: {', '.join(diffs)}; resume with the same settings "
                                 "or start afresh without --resume")
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            run.load_state_dict(restore(saved, self.accelerator.process_index,
                                        model=self.unwrapped, optimizer=optimizer,
                                        sharded=self.sharded))
            for name, stream in self.streams.items():
                if name in run.streams and hasattr(stream, "load_state_dict"):
                    stream.load_state_dict(run.streams[name])
            self.resumed_from = run.step
        else:
            seed_everything(config.seed)
            run.config = key
            if state_dir is not None and self.main and config.save_every:
                clear_states(state_dir)  # states of an earlier run must not be resumed
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- hooks

    def _count(self, stream, attribute: str, local: torch.Tensor) -> int:
        """The stream's count of the micro-batch just drawn over all processes
        (`last_tokens`, `last_targets` of a `BatchStream`), or this process's count of
        `local` times the processes for a stream that keeps none."""
        n = getattr(stream, attribute, None)
        return int(local.sum()) * self.world if n is None else int(n)

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
        if self.objective is not None and self.diverged_step is None:
            self._consider_best(metrics)
        entry = {"type": "eval", **entry}
        if write:
            self._write(entry)
        if self.should_stop is None or self.diverged_step is not None:
            return entry, None
        reason = self.should_stop(run.step, metrics)
        if self.world > 1:
            box = [reason]
            broadcast_object_list(box, from_process=0)
            reason = box[0]
        return entry, reason

    def _locals(self) -> list[torch.Tensor]:
        """The trained parameters as this process holds them (an FSDP shard's local part)."""
        return [p.to_local() if hasattr(p, "to_local") else p for p in self.params]

    def _consider_best(self, metrics: dict) -> None:
        """--keep-best: keep a copy of the trained weights (on the CPU) when this evaluation
        beats the best so far (the copy travels with a saved state, so --resume keeps it)."""
        run = self.run_state
        value = self.objective.value(metrics)
        if not self.objective.better(value, None if run.best is None else run.best["value"]):
            return
        with torch.no_grad():
            weights = [t.detach().to("cpu", copy=True) for t in self._locals()]
        run.best = {"step": run.step, "value": value, "weights": weights}

    def _restore_best(self) -> dict | None:
        """Put the best evaluation's weights back; what undo.json records about it."""
        best = self.run_state.best
        if self.objective is None or best is None:
            return None
        if best["step"] != self.run_state.step or self.diverged_step is not None:
            with torch.no_grad():
                for target, saved in zip(self._locals(), best["weights"], strict=True):
                    target.copy_(saved.to(target.device))
        return {**self.objective.describe(), "step": best["step"], "value": best["value"]}

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

    def _write(self, entry: dict) -> None:
        self.run_state.log.append(entry)
        if self.log_file is not None:
            self.log_file.write(to_json(entry) + "\n")
            self.log_file.flush()
        if self.on_log is not None:
            self.on_log(entry)

    def _save(self) -> None:
        run = self.run_state
        run.elapsed_s = self.elapsed_before + time.perf_counter() - self.started
        run.streams = {n: s.state_dict() for n, s in self.streams.items()
                       if hasattr(s, "state_dict")}
        run.window = self.window.state()
        save_state(self.accelerator, Path(self.config.state_dir), run.step, run.config,
                   model=self.unwrapped, optimizer=getattr(self.optimizer, "optimizer",
                                                           self.optimizer),
                   run=run.state_dict(), sharded=self.sharded)

    def _report_step(self) -> None:
        if self.on_step is not None:
            self.on_step(self.run_state.step, self.total_steps, self.run_state.tokens)

    def _note(self, text: str) -> None:
        if self.main:
            log.info(text)

    def _diverged(self, step: int, what: str) -> str:
        """Stop a diverging run: raise, or (keep_last_finite) restore the last finite weights."""
        reason = f"training diverged at step {step}: {what}"
        if not self.config.keep_last_finite:
            raise UndoError(f"{reason}; nothing was written. Lower --lr (or add --warmup-steps "
                            "or --max-grad-norm), or pass --keep-last-finite to keep the last "
                            "finite weights")
        if not all_finite(self.params):
            if self.shadow is None or not all_finite(self.shadow):
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
        loss = {k: v for k, v in last.items() if isinstance(v, float) and k not in NOT_TERMS}
        wall = self.elapsed_before + time.perf_counter() - self.started
        best = self._restore_best()
        self.accelerator.wait_for_everyone()
        model = gather_full_model(
            self.accelerator, self.prepared,
            self.accelerator.unwrap_model(self.prepared, keep_fp32_wrapper=False))
        return TrainResult(
            steps=run.step, tokens=run.tokens,
            flops={"trained": run.flops_trained, "frozen": run.flops_frozen,
                   "total": run.flops_trained + run.flops_frozen},
            loss=loss, evals=list(run.evals), stop_reason=stop, wall_time_s=wall,
            parameters=self.n_params, trainable_parameters=self.n_trainable,
            backward_parameters=self.n_backward, frozen_forward_params=self.frozen_forward_params,
            diverged=self.diverged_step is not None, diverged_step=self.diverged_step,
            resumed_from=self.resumed_from, log=list(run.log), is_main_process=self.main,
            num_processes=self.world, model=model, best=best,
        )

    def close(self) -> None:
        """Undo the run's temporary changes to the model; release accelerate's references."""
        for p in self.frozen_now:
            p.requires_grad_(True)
        if self.restore_model is not None:
            self.restore_model()
        if self.cache_setting is not None:
            self.model.config.use_cache = self.cache_setting
        self.model.train(self.was_training)
        if self.log_file is not None and not self.log_file.closed:
            self.log_file.close()
        self.shadow = None
        self.accelerator.free_memory()


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return float(value)


__all__ = ["Batch", "LossFn", "TrainResult", "backward_parameters", "count_parameters",
           "lm_loss", "lr_at", "planned_steps", "train"]
