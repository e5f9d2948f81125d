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
import types
from typing import Any

import torch

from undo_cli.errors import UsageError
from undo_cli.options.attack import QUANTIZE_SCHEMES, parse_quantize

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
    return {"bits": bits, "group_size": group_size,
            **_replace_weights(model, lambda m: quantize_dequantize(m, bits, group_size))}


def _replace_weights(model: torch.nn.Module, rounded) -> dict[str, Any]:
    """Replace the weight matrix of every linear layer of `model` by `rounded(matrix)` (in
    place); the layers, parameters replaced and largest absolute change."""
    layers = quantizable_layers(model)
    if not layers:
        raise UsageError("the model has no linear layers to quantise")
    changed, largest = 0, 0.0
    with torch.no_grad():
        for _, module, transposed in layers:
            w = module.weight
            matrix = w.t() if transposed else w
            new = rounded(matrix)
            largest = max(largest, float((new.float() - matrix.float()).abs().max()))
            matrix.copy_(new)
            changed += w.numel()
    return {"layers": len(layers), "parameters": changed, "max_abs_change": largest}


def quantized_copy(model: torch.nn.Module, bits: int,
                   group_size: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A quantised deep copy of `model` (the original is untouched) and its summary."""
    clone = copy.deepcopy(model)
    return clone, quantize_model(clone, bits, group_size)


# ----------------------------------------------------------------------------- library schemes

# Deployment quantisers, by name: (library, bits). nf4 and int8 are bitsandbytes' own
# (`load_in_4bit` NF4 with blocks of 64, `load_in_8bit`'s LLM.int8 row-wise absmax codes),
# on CUDA and on CPU (bitsandbytes >= 0.45 has CPU kernels for both); int4 is optimum-quanto's
# qint4 (affine, a scale and a shift per group of 128 input weights; bitsandbytes has no
# integer 4-bit format). The weights are quantised with the library and stored back as the
# library's own dequantisation, in the weight's dtype.
SCHEMES = {"nf4": ("bitsandbytes", 4), "int8": ("bitsandbytes", 8),
           "int4": ("optimum-quanto", 4)}
assert tuple(SCHEMES) == QUANTIZE_SCHEMES
QUANTO_GROUP = 128
NF4_BLOCK = 64
QUANTIZE_HINT = ("--quantize nf4|int8|int4 needs bitsandbytes (nf4, int8) and optimum-quanto "
                 "(int4): pip install 'undo-cli[quantize]'")


def scheme_bits(quantize: int | str) -> int:
    """The bit width of a `--quantize` value."""
    return SCHEMES[quantize][1] if isinstance(quantize, str) else int(quantize)


def _quiet_import(module: str):
    import importlib
    import logging

    names = ("bitsandbytes", "optimum", "optimum.quanto", "kernels")
    quiet = [logging.getLogger(n) for n in names]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(QUANTIZE_HINT) from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _quanto_python_unpack() -> None:
    """Let optimum-quanto unpack its 4-bit codes with its own Python implementation
    (`optimum.quanto.library.unpack`, exact bit operations) instead of compiling its C++
    extension on first use: minutes of a C++ build (with ninja), for the same integers."""
    try:
        from optimum.quanto.library.extensions import cpp
    except ImportError:  # pragma: no cover - another quanto layout: its own path then
        return
    ext = getattr(cpp, "ext", None)
    if ext is None or getattr(ext, "_lib", "missing") is not None:
        return
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        return torch.ops.quanto.unpack.default.redispatch(python_impl, packed, bits)

    ext._lib = types.SimpleNamespace(unpack=unpack)


def check_library(scheme: str) -> None:
    """`UsageError` (before any model loads) when the library of `scheme` is missing."""
    _quiet_import("bitsandbytes.functional" if SCHEMES[scheme][0] == "bitsandbytes"
                  else "optimum.quanto")


def library_dequantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """`weight` (output channels x inputs) quantised by the library of `scheme` and
    dequantised by that library: same shape and dtype.

    - nf4: `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`, then
      `dequantize_4bit` (NF4 code book, one absmax per 64 consecutive weights);
    - int8: `int8_vectorwise_quant(w)` -> `int8_vectorwise_dequant`: `round(127 w / max|row|)`
      per output channel, times `max|row| / 127`;
    - int4: `optimum.quanto.quantize_weight(w, qint4, axis=0, group_size=128)` with quanto's
      `MaxOptimizer` (affine: scale and shift per group), then `.dequantize()`; a row whose
      length 128 does not divide is one group.
    """
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantisation scheme {scheme!r}")
    w = weight.detach()
    if scheme in ("nf4", "int8"):
        functional = _quiet_import("bitsandbytes.functional")
        if scheme == "nf4":
            packed, state = functional.quantize_4bit(w.float().contiguous(), blocksize=NF4_BLOCK,
                                                     quant_type="nf4")
            out = functional.dequantize_4bit(packed, state, quant_type="nf4")
        else:
            codes, stats, _ = functional.int8_vectorwise_quant(w.float().contiguous())
            out = functional.int8_vectorwise_dequant(codes, stats)
        return out.reshape(w.shape).to(weight.dtype)
    quanto = _quiet_import("optimum.quanto")
    from optimum.quanto.tensor.optimizers import MaxOptimizer

    _quanto_python_unpack()
    cols = w.shape[1]
    group = QUANTO_GROUP if cols % QUANTO_GROUP == 0 else cols
    wf = w.float().contiguous()
    scale, shift = MaxOptimizer()(wf, quanto.qint4, axis=0, group_size=group)
    q = quanto.quantize_weight(wf, qtype=quanto.qint4, axis=0, scale=scale, shift=shift,
                               group_size=group, optimized=False)
    return q.dequantize().reshape(w.shape).to(weight.dtype)


def quantize_model_with(model: torch.nn.Module, quantize: int | str,
                        group_size: int | None = None) -> dict[str, Any]:
    """`quantize_model` for RTN bits (8, 4) and the library schemes alike; the summary names
    the scheme and the library."""
    if not isinstance(quantize, str):
        out = quantize_model(model, int(quantize), group_size)
        return {**out, "scheme": f"rtn{int(quantize)}", "library": "undo (round-to-nearest)"}
    library, bits = SCHEMES[quantize]
    return {"bits": bits, "group_size": None, "scheme": quantize, "library": library,
            **_replace_weights(model, lambda m: library_dequantize(m, quantize))}


__all__ = ["BITS", "SCHEMES", "library_dequantize", "parse_quantize", "quantize_model_with",
           "scheme_bits", "check_settings", "error_bound", "qmax", "quantizable_layers",
           "quantize_dequantize", "quantize_model", "quantized_copy"]
