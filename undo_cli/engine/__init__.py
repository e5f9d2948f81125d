"""The one training engine: every command that trains (train, unlearn, distill,
relearn-attack) runs its loss through `train`.

- `loop.py`: `train` and its step loop (gradient accumulation, clipping, SAM, NaN/inf guard,
  evaluation hooks, a JSONL log, progress callbacks, compute accounting, bf16 autocast on
  CUDA, budgets in steps, tokens or FLOPs);
- `schedule.py`: the optimizer (AdamW, Adam, SGD, SGD-Nesterov, Adagrad; no weight decay on
  1-D parameters) and the constant / linear / cosine schedules with warmup and a floor;
- `result.py`: what a run did and the running means of its log;
- `state.py`: training-state checkpoints with bit-exact `--resume`, and `training_output`;
- `processes.py`: one process or many (`accelerate launch -m undo_cli ...`, torchrun): DDP,
  FSDP2 (also over gloo on the CPU), DeepSpeed; devices and barriers.

The settings are `undo_cli.options.TrainConfig` (torch-free, so the command line builds its
options without importing torch).
"""

from undo_cli.engine.loop import (
    Batch,
    LossFn,
    TrainResult,
    backward_parameters,
    count_parameters,
    lm_loss,
    lr_at,
    planned_steps,
    train,
)
from undo_cli.engine.processes import (
    fsdp_requested,
    is_distributed,
    is_main_process,
    training_device,
    wait_for_everyone,
    world_size,
)
from undo_cli.engine.state import TRAIN_LOG, latest_state, remove_state, training_output
from undo_cli.options import TrainConfig

__all__ = [
    "TRAIN_LOG", "Batch", "LossFn", "TrainConfig", "TrainResult", "backward_parameters",
    "count_parameters",
    "fsdp_requested", "is_distributed", "is_main_process", "latest_state", "lm_loss", "lr_at",
    "planned_steps", "remove_state", "train", "training_device", "training_output",
    "wait_for_everyone", "world_size",
]
