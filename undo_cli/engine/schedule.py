"""The optimizer, the learning-rate schedule and the planned length of a run."""

from __future__ import annotations

import math

import torch

from undo_cli.options import BNB_OPTIMIZERS, OPTIMIZERS, TrainConfig

SGD_MOMENTUM = 0.9  # sgd and sgd-nesterov (the TAR red team's SGD adversaries use momentum)


def make_optimizer(groups: list[dict], config: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over parameter `groups` (each with its own
    `weight_decay`: none on norms and biases).

    adamw: AdamW (decoupled weight decay), fused on CUDA; adam: Adam (weight decay as L2 in
    the gradient); sgd: SGD with momentum 0.9; sgd-nesterov: the same with Nesterov momentum;
    adagrad: Adagrad; adafactor: transformers' Adafactor at the scheduled learning rate
    (no relative step, no parameter scaling); adamw8bit / paged_adamw8bit: bitsandbytes'
    8-bit AdamW (CUDA; `runtime.require_optimizers` refuses them earlier). Betas apply to the
    Adam kinds.
    """
    kind = config.optimizer
    fused = {"fused": True} if device.type == "cuda" else {}
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), **fused)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=tuple(config.betas), **fused)
    if kind in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(groups, lr=config.lr, momentum=SGD_MOMENTUM,
                               nesterov=kind == "sgd-nesterov")
    if kind == "adagrad":
        return torch.optim.Adagrad(groups, lr=config.lr)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=config.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if kind in BNB_OPTIMIZERS:
        from undo_cli.runtime import require_optimizers

        require_optimizers([kind], str(device))
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=config.lr, betas=tuple(config.betas))
    raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")


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


def planned_steps(config: TrainConfig, streams: dict, flops_per_token: float) -> int | None:
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
