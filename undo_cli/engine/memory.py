"""What a run does to its model to save memory: pure bf16 weights and gradient checkpointing.

`prepare_model(model, config)` applies `--bf16-weights` (the parameters, hence their gradients
and the optimizer's state, become bf16) and `--gradient-checkpointing` (transformers'
activation checkpointing with `use_reentrant=False`: each decoder layer's activations are
recomputed in the backward pass instead of kept). It returns the function that turns
checkpointing off again after the run (the weights stay in the dtype they trained in).

Checkpointing a PEFT (LoRA) model: transformers enables it on the base model, and the input
embeddings' output is made to require a gradient (`enable_input_require_grads`), so that a
frozen embedding under a checkpointed layer still lets the gradient reach the adapters (with
the reentrant variant a LoRA run would otherwise silently train nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from undo_cli.errors import UsageError
from undo_cli.options import TrainConfig

CHECKPOINT_KWARGS = {"use_reentrant": False}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def enable_checkpointing(model: torch.nn.Module) -> Callable[[], None]:
    """Turn on gradient checkpointing (non-reentrant) of a transformers model, or of the base
    model of a PEFT model, with inputs that require grad; returns the function turning it off.
    `UsageError` for a model that does not support it."""
    inner = base_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UsageError(f"--gradient-checkpointing: {type(inner).__name__} does not support "
                         "gradient checkpointing")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
    inner.enable_input_require_grads()

    def disable() -> None:
        if hasattr(inner, "activation_checkpointing_disable"):
            inner.activation_checkpointing_disable()
        else:
            inner.gradient_checkpointing_disable()
        inner.disable_input_require_grads()

    return disable


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers' flag on the model or its base)."""
    inner = base_model(model)
    flag = getattr(inner, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(inner, "is_gradient_checkpointing", False)
    return bool(flag() if callable(flag) else flag)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> Callable[[], None]:
    """Apply `config.bf16_weights` and `config.gradient_checkpointing` to `model` (in place,
    before the optimizer is made); returns the clean-up to run after training."""
    if config.bf16_weights:
        model.to(torch.bfloat16)  # the same Parameter objects, now bf16
    if config.gradient_checkpointing:
        return enable_checkpointing(model)
    return lambda: None
