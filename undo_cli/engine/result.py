"""What a run did (`TrainResult`) and the running means of its log lines (`LogWindow`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

FLOPS_FORMULA = (
    "(2 * parameters + 2 * backward_parameters + 2 * trainable_parameters) * tokens: forward "
    "through every parameter, backward through the activations from the lowest trained "
    "parameter up (plus the output head), weight gradients of the trained parameters only; "
    "= 6 * parameters * tokens when all train; x2 with SAM; + 2 * frozen_forward_params * "
    "tokens for frozen models run forward (teacher, reference)")
NOT_TERMS = {"type", "step", "lr", "grad_norm", "tokens", "flops", "tokens_per_s",
             "elapsed_s"}


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
    parameters: int  # P of the trained model
    trainable_parameters: int
    backward_parameters: int | None = None  # P_backward (engine.loop); None: P
    frozen_forward_params: int = 0
    diverged: bool = False  # only with keep_last_finite: the weights are the last finite ones
    diverged_step: int | None = None
    resumed_from: int | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    is_main_process: bool = True
    num_processes: int = 1
    model: Any = None  # the trained model, unwrapped from any DDP/accelerate wrapper
    best: dict[str, Any] | None = None  # --keep-best: metric, mode, step, value (the weights)

    def final_metrics(self) -> dict[str, Any]:
        """The metrics of the last evaluation (with --keep-best: of the best one, whose
        weights the model holds), without its step/tokens/flops counters."""
        last = self.evals[-1] if self.evals else {}
        if self.best is not None:
            last = next((e for e in reversed(self.evals) if e.get("step") == self.best["step"]),
                        last)
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
            "backward_parameters": (self.parameters if self.backward_parameters is None
                                    else self.backward_parameters),
            "frozen_forward_params": self.frozen_forward_params,
            "flops_formula": FLOPS_FORMULA,
            "processes": self.num_processes,
            "stop_reason": self.stop_reason,
            "diverged_step": self.diverged_step,
        }


class LogWindow:
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
            k: v for k, v in self.terms.items() if k not in NOT_TERMS and k != "loss"}}
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
