"""Round-to-nearest weight quantisation: the quantisation attack of `undo relearn-attack`.

Quantising an unlearned model can bring forgotten knowledge back (the wider unlearning
literature reports it for 4-bit quantisation), so the attack measures it like any finetuning
run. The quantisation here is the simplest one, applied to the weight matrix W of every
linear layer (the output head excluded):

- symmetric, round-to-nearest (RTN): with `qmax = 2**(bits - 1) - 1` (127 for 8 bits, 7 for
  4 bits) and a scale `s = max|w| / qmax` per group, each weight becomes
  `q = clamp(round(w / s), -qmax, qmax)` and is stored back *dequantised*, `q * s`, in the
  weight's own dtype, so the model runs anywhere (no integer kernels);
- a group is one output channel (a row of W) by default, or `group_size` consecutive input
  weights of a row (the last group of a row may be shorter); a group of zeros stays zero;
- the error of every weight is at most half a step: `|w - q * s| <= s / 2 =
  max|w_group| / (2 * qmax)` (`error_bound`).

Layers: `torch.nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored transposed:
its output channels are the columns). The output head (`get_output_embeddings()`) and any
layer sharing its weight with the input embedding are left alone, as weight-only quantisers
usually do; embeddings, norms and biases are not quantised.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from undo_cli.errors import UsageError

BITS = (8, 4)


def qmax(bits: int) -> int:
    """The largest quantised magnitude of a symmetric `bits`-bit code: 2**(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def check_settings(bits: int, group_size: int | None) -> None:
    """`UsageError` for a bit width other than 8 or 4, or a group size below 1."""
    if bits not in BITS:
        raise UsageError(f"--quantize must be 8 or 4 (got {bits})")
    if group_size is not None and group_size < 1:
        raise UsageError(f"--group-size must be at least 1 (got {group_size})")


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """(rows, groups, group) view of a 2-D weight (rows = output channels), zero-padded."""
    rows, cols = w.shape
    if group_size is None or group_size >= cols:
        return w.reshape(rows, 1, cols), 0
    pad = (-cols) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, -1, group_size), pad


def quantize_dequantize(weight: torch.Tensor, bits: int,
                        group_size: int | None = None) -> torch.Tensor:
    """`weight` (output channels x inputs) after symmetric RTN quantisation to `bits` bits and
    back (module doc): same shape and dtype, computed in fp32."""
    check_settings(bits, group_size)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    groups, pad = _grouped(weight.detach().float(), group_size)
    top = qmax(bits)
    scale = groups.abs().amax(dim=-1, keepdim=True) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / safe), -top, top)
    deq = (q * scale).reshape(rows, -1)[:, :cols] if pad else (q * scale).reshape(rows, cols)
    return deq.to(weight.dtype)


def error_bound(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Per weight, the largest possible |w - quantize_dequantize(w)|: half the step of its
    group, `max|w_group| / (2 * qmax(bits))`."""
    rows, cols = weight.shape
    groups, _ = _grouped(weight.detach().float(), group_size)
    half_step = groups.abs().amax(dim=-1, keepdim=True) / (2 * qmax(bits))
    return half_step.expand_as(groups).reshape(rows, -1)[:, :cols]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return ()
    return (Conv1D,)


def quantizable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """`(name, module, transposed)` of the layers `quantize_model` touches (module doc)."""
    skip: set[int] = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    conv = _conv1d_type()
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in skip:
            continue
        if isinstance(module, torch.nn.Linear):
            out.append((name, module, False))
        elif conv and isinstance(module, conv):
            out.append((name, module, True))
    return out


def quantize_model(model: torch.nn.Module, bits: int,
                   group_size: int | None = None) -> dict[str, Any]:
    """Quantise (and dequantise) the linear layers of `model` in place; returns a summary:
    layers, parameters quantised, bits, group size, largest absolute weight change."""
    check_settings(bits, group_size)
    layers = quantizable_layers(model)
    if not layers:
        raise UsageError("the model has no linear layers to quantise")
    changed, largest = 0, 0.0
    with torch.no_grad():
        for _, module, transposed in layers:
            w = module.weight
            matrix = w.t() if transposed else w
            new = quantize_dequantize(matrix, bits, group_size)
            largest = max(largest, float((new.float() - matrix.float()).abs().max()))
            matrix.copy_(new)
            changed += w.numel()
    return {"bits": bits, "group_size": group_size, "layers": len(layers),
            "parameters": changed, "max_abs_change": largest}


def quantized_copy(model: torch.nn.Module, bits: int,
                   group_size: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A quantised deep copy of `model` (the original is untouched) and its summary."""
    clone = copy.deepcopy(model)
    return clone, quantize_model(clone, bits, group_size)


__all__ = ["BITS", "check_settings", "error_bound", "qmax", "quantizable_layers",
           "quantize_dequantize", "quantize_model", "quantized_copy"]
