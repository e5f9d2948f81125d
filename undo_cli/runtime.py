"""Process-wide set-up shared by every command: offline mode, quiet libraries, devices, seeds.

Importing this module is cheap: it sets the environment and imports no torch (`undo --help`
and `undo perturb` never import torch or transformers); `pick_device` and `seed_everything`
import torch when called.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

# Nothing in undo ever downloads from a hub: checkpoints are local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers and huggingface_hub read these when they are imported: no info logs, no
# progress bars of their own (undo shows its own).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

if TYPE_CHECKING:
    import torch

# bitsandbytes (imported by peft) tries to fetch an optional CPU 4-bit kernel from the hub
# and, offline, logs two warnings about it on every LoRA or QLoRA run; its own CPU code is used
# instead, so there is nothing to act on. Only these two loggers: bitsandbytes' others speak.
OFFLINE_KERNEL_LOGGERS = ("kernels", "bitsandbytes.backends.cpu.ops")


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs; undo shows its own progress.

    The environment set above does it for libraries imported later; this also quiets them if
    they were imported already (so commands that need no transformers never import it).
    """
    import sys
    import warnings

    # accelerate's DDP wrapping asks transformers 5 a deprecated question; nothing to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    for name in OFFLINE_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" not in sys.modules:
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older hub
        pass


def set_threads(count: int) -> None:
    """Use `count` CPU threads for torch's intra-op work (and for OpenMP/MKL libraries loaded
    later, through OMP_NUM_THREADS / MKL_NUM_THREADS)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the system's available memory, or less
    under a cgroup limit (containers, batch jobs); `UNDO_MEMORY_LIMIT` (bytes) replaces the
    measurement (e.g. on a machine with much swap). None where unknown."""
    found: list[int] = []
    limit = os.environ.get("UNDO_MEMORY_LIMIT", "").strip()
    if limit.isdigit():
        return int(limit)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: memory.max is "max" or bytes
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            cap = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if cap.isdigit():
            found.append(max(0, int(cap) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1", ...) or CUDA when available, else CPU."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_optimizers(names: Iterable[str], device: str | None = None) -> None:
    """`UsageError` (before any work) if an optimizer of `names` cannot run here: the 8-bit
    ones need bitsandbytes (the optional extra `undo-cli[bnb]`) and a CUDA device."""
    import importlib.util

    from undo_cli.errors import UsageError
    from undo_cli.options import BNB_OPTIMIZERS

    wanted = [n for n in names if n in BNB_OPTIMIZERS]
    if not wanted:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--optimizer {wanted[0]} needs bitsandbytes, which is not installed: "
                         "pip install 'undo-cli[bnb]' (CUDA only), or use adamw or adafactor")
    if pick_device(device).type != "cuda":
        raise UsageError(f"--optimizer {wanted[0]} needs a CUDA device (bitsandbytes' 8-bit "
                         "optimizers); on the CPU use adamw or adafactor")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(seed)
