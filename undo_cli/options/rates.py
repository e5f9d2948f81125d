"""Every default learning rate, decided in one place (`default_lr`); `--help` shows these
numbers, and the stages and the unlearning methods use them."""

from __future__ import annotations

PRESET_LR = 1e-3  # `undo train --init PRESET`: pretraining a new model
FINETUNE_LR = 1e-4  # `undo train --init CKPT`, and every TrainConfig not told otherwise
DISTILL_LR = 1e-3  # `undo distill`: tiny models trained from a noised init
UNLEARN_LR = 5e-5  # `undo unlearn` on models of TINY_MODEL_PARAMS+ (the paper's 1e-5..8e-5)
UNLEARN_TINY_LR = 1e-3  # ... and on smaller, toy models
RMU_TINY_LR = 1e-2  # RMU on toy models (it trains only a few matrices)
TINY_MODEL_PARAMS = 10_000_000  # below: a toy model (tests, examples)


def default_lr(command: str, *, preset: bool = False, parameters: int | None = None,
               lr: float = UNLEARN_LR, tiny_lr: float = UNLEARN_TINY_LR) -> float:
    """The learning rate of `command` when `--lr` is not given: `train` by `preset` or
    checkpoint, `distill` one rate, `unlearn` by the model's `parameters` (a method's `lr`
    from TINY_MODEL_PARAMS up, its `tiny_lr` below)."""
    if command == "train":
        return PRESET_LR if preset else FINETUNE_LR
    if command == "distill":
        return DISTILL_LR
    if command == "unlearn":
        if parameters is None:
            raise ValueError("the unlearning learning rate depends on the model's size")
        return lr if parameters >= TINY_MODEL_PARAMS else tiny_lr
    return FINETUNE_LR
