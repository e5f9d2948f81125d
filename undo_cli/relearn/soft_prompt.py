"""The embedding (soft-prompt) attack: `undo relearn-attack --embedding-attack STEPS
--prompt-tokens N`.

N free embedding vectors P (`[N, H]`) are placed before every input and optimised on the
attack data with every weight of the model frozen (the embedding-space attack of
TamperBench; Schwinn et al. 2024), minimising the attack data's language-model loss

    L(P) = - sum_t log p(x_t | P, x_<t)    over the data's target tokens (the prompt's
                                           positions predict nothing)

How: the model's input embedding is wrapped (`SoftPromptEmbedding`) so that the N ids
V .. V+N-1 past its vocabulary V look up P; every other id is the original embedding. The
output head is not touched (a tied head keeps the original matrix), so the vocabulary the
model predicts is unchanged. Training rows and evaluation items get the N ids in front
(`PrefixedStream`, `prefix_eval_set`), so evaluation (scores, greedy generation, multiple
choice) runs unchanged through `undo_cli.evaluate`. The training rows are unpacked to one
document per row, so that every document sees the prompt.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from undo_cli.data.batches import unpack_documents
from undo_cli.losses import IGNORE_INDEX


class SoftPromptEmbedding(torch.nn.Module):
    """An input embedding with `n` extra trainable rows P for the ids `vocab .. vocab+n-1`."""

    def __init__(self, base: torch.nn.Module, n: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.vocab = int(base.weight.shape[0])
        # In a child module registered after `base`, so that the parameter order (which the
        # engine's backward accounting follows) is the embedding matrix, then the prompt.
        self.soft = torch.nn.Module()
        self.soft.prompt = torch.nn.Parameter(init.detach().clone().reshape(n, -1))

    @property
    def prompt(self) -> torch.nn.Parameter:
        """The soft prompt P, `[n, H]`."""
        return self.soft.prompt

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings() read
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.vocab
        out = self.base(ids.clamp(max=self.vocab - 1))
        if not bool(virtual.any()):
            return out
        # A lookup (not `prompt[index]`, whose backward accumulates the rows' gradients in a
        # thread-dependent order on CPU): the same seed gives bit-identical prompts.
        rows = torch.nn.functional.embedding(
            (ids - self.vocab).clamp(0, self.prompt.shape[0] - 1), self.prompt)
        return torch.where(virtual[..., None], rows.to(out.dtype), out)


def attach_soft_prompt(model: torch.nn.Module, n: int, seed: int
                       ) -> tuple[torch.nn.Module, list[int]]:
    """A copy of `model` with every weight frozen and a soft prompt of `n` embeddings,
    initialised as the embeddings of `n` vocabulary tokens drawn by `seed` (as the output of
    the original embedding module, so scaled embeddings stay in scale); returns (copy, the
    prompt's ids)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    base = clone.get_input_embeddings()
    vocab = int(base.weight.shape[0])
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    picks = torch.randint(0, vocab, (n,), generator=g).to(base.weight.device)
    with torch.no_grad():
        init = base(picks).float()
    wrapped = SoftPromptEmbedding(base, n, init)
    clone.set_input_embeddings(wrapped)
    return clone, list(range(vocab, vocab + n))


def prompt_of(model: torch.nn.Module) -> torch.Tensor:
    """The soft prompt P of a model from `attach_soft_prompt`."""
    return model.get_input_embeddings().prompt


def prefix_eval_set(es: Any, ids: list[int]) -> Any:
    """An `EvalSet` with `ids` before every sequence (its scored tokens unchanged)."""
    n = len(ids)
    return replace(es, sequences=[list(ids) + list(s) for s in es.sequences],
                   starts=[s + n for s in es.starts])


class PrefixedStream:
    """A `BatchStream` whose batches are unpacked to one document per row, each with `ids` in
    front (labels ignored there, attention on); everything else is the wrapped stream's."""

    def __init__(self, stream: Any, ids: list[int], pad_id: int):
        self.stream, self.ids, self.pad_id = stream, torch.tensor(ids, dtype=torch.long), pad_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.stream)
        if "position_ids" in batch:
            batch = unpack_documents(batch, self.pad_id)
        rows = batch["input_ids"].shape[0]
        n = len(self.ids)
        front = self.ids[None, :].expand(rows, n)
        out = dict(batch)
        out["input_ids"] = torch.cat([front, batch["input_ids"]], 1)
        out["labels"] = torch.cat(
            [torch.full((rows, n), IGNORE_INDEX, dtype=torch.long), batch["labels"]], 1)
        out["attention_mask"] = torch.cat(
            [torch.ones((rows, n), dtype=batch["attention_mask"].dtype),
             batch["attention_mask"]], 1)
        return out
