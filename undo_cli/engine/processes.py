"""Processes and devices of a run: single process, or data-parallel under `accelerate launch` /
torchrun (DDP, FSDP2, DeepSpeed), with the helpers every command that trains shares."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM

from undo_cli.errors import UndoError
from undo_cli.runtime import pick_device

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes of the launch (`accelerate launch` / `torchrun` set WORLD_SIZE; 1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True when launched by `accelerate launch` / `torchrun` with more than one process."""
    return world_size() > 1


def fsdp_requested() -> bool:
    """True when the launcher was given an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def process_state():
    """accelerate's process state; on a machine without CUDA, processes talk over gloo."""

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
    return process_state().is_main_process if is_distributed() else True


def training_device(device: str | None = None) -> torch.device:
    """The device `train` uses: the launcher's (one GPU per process) under a multi-process
    launch, else `device` (None: CUDA if present)."""

    return process_state().device if is_distributed() else pick_device(device)


def wait_for_everyone() -> None:
    """A barrier across processes (no-op in a single process)."""
    if is_distributed():
        process_state().wait_for_everyone()


def make_accelerator(device_name: str | None):
    """`(accelerator, device)` for a run on `device_name` (None: CUDA if present), or on the
    launcher's devices under a multi-process launch."""


    # accelerate logs notes such as "Removed shared tensor ... while saving" (tied weights).
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if not is_distributed():
        device = pick_device(device_name)
        cpu = device.type == "cpu"
        if cpu and PartialState._shared_state and PartialState().device.type != "cpu":
            # An earlier run in this process set accelerate up for a GPU.
            AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=cpu, device_placement=False), device
    # Under a multi-process launch the launcher decides the devices: CUDA if present.
    process_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    _fsdp_on_cpu(accelerator)
    return accelerator, accelerator.device


def _fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP2 config (`accelerate launch --config_file examples/accelerate/fsdp.yaml`)
    on a machine without CUDA. accelerate turns FSDP on only for GPU-like process groups
    (AcceleratorState: `distributed_type in [MULTI_GPU, ...]`); over gloo (MULTI_CPU) it drops
    the plugin and silently runs DDP. torch's FSDP2 (`fully_shard`) works on a CPU device mesh
    over gloo, so do here what accelerate does on GPUs: keep the plugin and mark the (shared)
    state FSDP. This is what lets the FSDP path run in the CPU tests (tests/e2e/test_fsdp.py)."""

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


def all_finite(params: list[torch.Tensor]) -> bool:
    """True if every tensor is finite. Sharded (FSDP2 DTensor) parameters are checked shard by
    shard and the verdict is agreed by all processes."""
    sharded = any(hasattr(p, "to_local") for p in params)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    finite = torch.stack([torch.isfinite(p).all() for p in local]).all()
    if sharded and is_distributed():
        import torch.distributed as dist

        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def gather_full_model(accelerator, prepared, model):
    """Under FSDP or DeepSpeed ZeRO-3 every process holds a shard of the weights: gather them
    (all processes take part) into a plain copy of the model on the main process, which is
    what the commands save. Without sharding, `model` itself."""

    kind = accelerator.distributed_type
    zero3 = kind == DistributedType.DEEPSPEED and (
        accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3)
    if kind != DistributedType.FSDP and not zero3:
        return model
    state = accelerator.get_state_dict(prepared)  # full, on the main process
    if not accelerator.is_main_process:
        return model

    full = AutoModelForCausalLM.from_config(model.config)
    missing, _ = full.load_state_dict(state, strict=False)
    full.tie_weights()
    own = full.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    lost = [k for k in missing if own[k].data_ptr() not in loaded]  # tied ones are shared
    if lost:
        raise UndoError(f"gathering the sharded weights lost {lost[:5]}; nothing was written")
    return full
