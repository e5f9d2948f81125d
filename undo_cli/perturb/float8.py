"""float8 tensors for the noise step: numpy has no float8 types, torch has them. The one part
of `undo perturb` that imports torch, and only when a checkpoint holds float8 weights."""

from __future__ import annotations

import numpy as np

from undo_cli.checkpoint.safetensors_io import torch_dtype


def widen_float8(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The float8 elements stored in `raw` (bytes of safetensors `dtype`) as fp32."""
    import torch

    return torch.from_numpy(raw.copy()).view(torch_dtype(dtype)).float().numpy()


def narrow_to_float8(work: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 `work` rounded to nearest-even in float8 `dtype`, as bytes."""
    import torch

    return torch.from_numpy(work).to(torch_dtype(dtype)).view(torch.uint8).numpy()
