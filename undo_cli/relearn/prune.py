"""Pruning attacks (`undo relearn-attack --prune magnitude:S|wanda:S`).

Pruning an unlearned model can undo unlearning the way quantisation does: unlearning often
moves many weights a little, and pruning removes exactly the small ones. Both methods are
unstructured and one-shot, on the layers the quantisation attack touches
(`undo_cli.quantize.quantizable_layers`: every linear layer but the output head and
embeddings), and set the pruned weights to exactly zero:

- magnitude (Han et al. 2015): in every layer, the `floor(S * numel)` weights of smallest
  |W_ij| (ties broken by position);
- Wanda (Sun et al. 2024, "A simple and effective pruning approach for LLMs"): the score of
  weight W_ij (output i, input j) is `|W_ij| * ||X_j||_2`, X_j input feature j of the layer
  over the calibration tokens; in every output row, the `floor(S * inputs)` weights of
  smallest score. The activation norms come from one forward pass of the unpruned model over
  `WANDA_ROWS` rows of the attack data (the reference implementation prunes layer by layer
  with inputs from the already-pruned layers below; this is the one-pass variant).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from undo_cli.quantize import quantizable_layers

WANDA_ROWS = 128  # calibration rows (the paper's 128 sequences)


def _matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(name, module, weight as output x input) of every prunable layer (a view: writes go
    to the weight)."""

    return [(name, module, module.weight.t() if transposed else module.weight)
            for name, module, transposed in quantizable_layers(model)]


def _zero_smallest_(matrix: torch.Tensor, scores: torch.Tensor, k: int, per_row: bool) -> int:
    """Zero the `k` entries of smallest score (per row, or over the whole matrix)."""
    if k <= 0:
        return 0
    with torch.no_grad():
        if per_row:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
        else:
            idx = torch.topk(scores.flatten(), k, largest=False).indices
            mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
            mask[idx] = True
            mask = mask.view_as(scores)
        matrix.masked_fill_(mask, 0)
    return int(mask.sum())


def magnitude_prune_(model: torch.nn.Module, sparsity: float) -> dict[str, Any]:
    """Zero the smallest-magnitude `sparsity` share of every prunable layer, in place."""
    pruned = total = 0
    for _, _, matrix in _matrices(model):
        k = math.floor(sparsity * matrix.numel())
        pruned += _zero_smallest_(matrix, matrix.detach().abs().float(), k, per_row=False)
        total += matrix.numel()
    return {"method": "magnitude", "sparsity": sparsity, "pruned": pruned,
            "parameters": total}


def activation_norms(model: torch.nn.Module, rows: Iterable[torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Per prunable layer, `||X_j||_2` of each input feature over every token of `rows`
    (1-D token-id tensors, each run alone so that no padding counts)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def record(_module, inputs, _output) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sq = (x * x).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
        return record

    for name, module, _ in _matrices(model):
        handles.append(module.register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in rows:
                model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_scores(matrix: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score `|W_ij| * ||X_j||` of an output x input weight."""
    return matrix.detach().abs().float() * norms.to(matrix.device).float()[None, :]


def wanda_prune_(model: torch.nn.Module, sparsity: float,
                 norms: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Zero, in every output row of every prunable layer, the `sparsity` share of weights of
    smallest Wanda score (`norms`: `activation_norms`), in place."""
    pruned = total = 0
    for name, _, matrix in _matrices(model):
        if name not in norms:  # a layer the calibration never reached: magnitude per row
            scores = matrix.detach().abs().float()
        else:
            scores = wanda_scores(matrix, norms[name])
        k = math.floor(sparsity * matrix.shape[1])
        pruned += _zero_smallest_(matrix, scores, k, per_row=True)
        total += matrix.numel()
    return {"method": "wanda", "sparsity": sparsity, "pruned": pruned, "parameters": total}


def calibration_rows(stream: Any, rows: int = WANDA_ROWS) -> list[torch.Tensor]:
    """Up to `rows` token rows (padding removed) drawn from a `BatchStream` of the attack
    data, from its start."""
    stream.load_state_dict({"position": 0})
    out: list[torch.Tensor] = []
    for batch in stream:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            out.append(ids[mask.bool()])
            if len(out) >= rows:
                break
        if len(out) >= rows or not out:
            break
    stream.load_state_dict({"position": 0})
    return [r for r in out if r.numel()]


def prune_model_(model: torch.nn.Module, method: str, sparsity: float,
                 calibration: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Prune `model` in place by `method` (`magnitude`, or `wanda` on `calibration` rows)."""
    if method == "magnitude":
        return magnitude_prune_(model, sparsity)
    norms = activation_norms(model, calibration or [])
    summary = wanda_prune_(model, sparsity, norms)
    summary["calibration_rows"] = len(calibration or [])
    summary["calibration_tokens"] = sum(int(r.numel()) for r in calibration or [])
    return summary
