"""Batches from token sources: weighted mixing, padding, packed-document model inputs, the
fallback for models without packed-sequence support, and `build_stream`. See `undo_cli.data`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from undo_cli.data.sources import (
    Item,
    Source,
    ensure_special_tokens,
    load_source,
    stream_key,
)
from undo_cli.errors import UsageError
from undo_cli.losses import IGNORE_INDEX
from undo_cli.options import DEFAULT_PACKING, PACKING_MODES
from undo_cli.records import parse_weighted_spec

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]

# A distinct constant mixed into the seeds of the mixing draws.
_MIXING_KEY = 7919
_MIX_CHUNK = 1024


def collate(items: Sequence[Item], pad_id: int) -> Batch:
    """Right-pad `(ids, labels, positions)` rows to the longest. `labels=None` means labels =
    ids; `positions=None` means 0, 1, 2, ... Padding continues the positions of the row's
    last document (it is never attended to by a real token, and stays within the row's
    length for models with absolute position embeddings)."""
    width = max(len(ids) for ids, _, _ in items)
    n = len(items)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for row, (ids, lab, pos) in enumerate(items):
        m = len(ids)
        input_ids[row, :m] = ids
        attention[row, :m] = 1
        labels[row, :m] = ids if lab is None else lab
        if pos is not None:
            positions[row, :m] = pos
            positions[row, m:] = pos[-1] + 1 + np.arange(width - m)
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions)}


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The keyword arguments of a model's forward on a training batch (module doc): ids and
    position ids without attention mask or KV cache, so that packed documents attend only to
    themselves; a batch without position ids (e.g. one document per row) gets its mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
            "use_cache": False}


def unpack_documents(batch: Batch, pad_id: int) -> Batch:
    """The documents of a packed batch one per row (right-padded, with `attention_mask` and
    without position ids): the same tokens and labels, so the same loss and gradient. Rows are
    the documents in their packed order, so every per-token tensor of the batch keeps its
    order when read row-major over the kept positions; other entries are kept as they are.
    """
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    positions, real = batch["position_ids"].numpy(), batch["attention_mask"].numpy()
    items: list[Item] = []
    for row in range(ids.shape[0]):
        n = int(real[row].sum())
        starts = np.flatnonzero(positions[row, :n] == 0).tolist() + [n]
        items += [(ids[row, a:b], labels[row, a:b], None) for a, b in zip(starts, starts[1:])]
    out = collate(items, pad_id)
    del out["position_ids"]
    extra = {k: v for k, v in batch.items() if k not in out and k != "position_ids"}
    return {**out, **extra}


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether `model` gives each document of a packed row the logits it gets alone.

    Three forwards on a 12-token probe (documents of 5 and 7 random tokens): packed with
    restarting position ids as `model_inputs` passes them, and each alone. Supported when the
    packed logits match (within 10% of the error that attending across the boundary makes,
    or to 1e-4 of the logits' scale). The four architectures of `undo init` pass; a model
    whose attention ignores packed position ids (custom code, an old implementation) fails,
    and so does one that raises. The answer is cached on the model.
    """
    cached = getattr(model, "_undo_packing_supported", None)
    if cached is not None:
        return cached
    ok = False
    was_training = model.training
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, 7))
        both = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
        model.eval()
        with torch.no_grad():
            packed = model(input_ids=both, position_ids=positions, use_cache=False).logits
            crossed = model(input_ids=both, use_cache=False).logits[:, 5:]
            alone = model(input_ids=b, use_cache=False).logits
            first = model(input_ids=a, use_cache=False).logits
        error = max(float((packed[:, :5] - first).abs().max()),
                    float((packed[:, 5:] - alone).abs().max()))
        wrong = float((crossed - alone).abs().max())
        ok = error <= max(0.1 * wrong, 1e-4 * float(alone.abs().max()))
    except Exception:  # noqa: BLE001 - any failure means: do not rely on it
        ok = False
    finally:
        model.train(was_training)
    with contextlib.suppress(AttributeError):
        model._undo_packing_supported = ok
    return ok


class _Mixer:
    """Which source each global example index comes from, and its index in that source.

    Example j's source is drawn with probabilities `weights` by a generator seeded by
    (seed, j // CHUNK): any position can be reached by counting, without replaying batches.
    """

    def __init__(self, weights: Sequence[float], seed: list[int]):
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.seed = seed
        self.n = len(w)
        self._counts = [np.zeros(self.n, dtype=np.int64)]  # counts before chunk c
        self._chunk: tuple[int, np.ndarray] | None = None

    def _choices(self, c: int) -> np.ndarray:
        if self._chunk is None or self._chunk[0] != c:
            rng = np.random.default_rng([*self.seed, _MIXING_KEY, c])
            self._chunk = (c, rng.choice(self.n, size=_MIX_CHUNK, p=self.p))
        return self._chunk[1]

    def locate(self, j: int) -> tuple[int, int]:
        """(source, index within that source) of global example `j`."""
        if self.n == 1:
            return 0, j
        c, off = divmod(j, _MIX_CHUNK)
        while len(self._counts) <= c:
            k = len(self._counts) - 1
            self._counts.append(self._counts[k] + np.bincount(self._choices(k),
                                                              minlength=self.n))
        choices = self._choices(c)
        s = int(choices[off])
        return s, int(self._counts[c][s] + np.count_nonzero(choices[:off] == s))


class BatchStream:
    """Endless batches from one or more weighted sources (see the module docstring).

    Iterating yields `{"input_ids", "attention_mask", "labels", "position_ids"}` CPU tensors of
    this process's `batch_size` examples. `position` counts global micro-batches drawn;
    `state_dict()` / `load_state_dict()` save and restore it. `last_tokens` is the number of
    (non-padding) tokens in the last *global* micro-batch and `last_targets` the number of
    its predicted tokens (kept labels after the causal shift), the same on every process.
    """

    def __init__(self, sources: Sequence[Source], batch_size: int, seed: int, pad_id: int,
                 name: str = "data"):
        if not sources:
            raise UsageError(f"{name}: no data files given")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1 (got {batch_size})")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.name = name
        self.rank, self.world = 0, 1
        self.position = 0
        self.last_tokens = 0
        self.last_targets = 0
        self.padded_documents = False
        self._mixer = _Mixer([s.weight for s in self.sources], [seed, stream_key(name)])

    def shard(self, rank: int, world: int) -> None:
        """Take slice `rank` of `world` of every global micro-batch (call before drawing)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.rank, self.world = rank, world

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world

    def tokens_per_batch(self) -> float:
        """Expected tokens in one global micro-batch (exact for text-only streams)."""
        p = self._mixer.p
        mean = sum(float(pi) * s.mean_item_tokens for pi, s in zip(p, self.sources, strict=True))
        return mean * self.global_batch_size

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        g = self.global_batch_size
        first = self.position * g
        mine = range(first + self.rank * self.batch_size,
                     first + (self.rank + 1) * self.batch_size)
        items, total, targets = [], 0, 0
        for j in range(first, first + g):
            s, k = self._mixer.locate(j)
            source = self.sources[s]
            if j in mine:
                item = source.item(k)
                items.append(item)
                total += len(item[0])
                labels = item[0] if item[1] is None else item[1]
                targets += int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
            else:
                total += source.item_tokens(k)
                targets += source.item_targets(k)
        self.position += 1
        self.last_tokens = total
        self.last_targets = targets
        batch = collate(items, self.pad_id)
        return unpack_documents(batch, self.pad_id) if self.padded_documents else batch

    @property
    def packs_documents(self) -> bool:
        """Whether rows can hold several documents that must not see each other."""
        return any(getattr(s, "packing", None) == "documents" for s in self.sources)

    def pad_documents(self) -> None:
        """From now on, one document per row (for a model without packed-sequence support)."""
        self.padded_documents = True

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def describe(self) -> list[dict]:
        """One entry per source, for manifests: path, weight, shape, records, tokens."""
        total = sum(s.weight for s in self.sources)
        return [{"path": s.path, "weight": s.weight / total, "shape": s.shape,
                 "records": len(s), "tokens_per_epoch": s.epoch_tokens,
                 **({"packing": "documents-padded" if self.padded_documents
                     and s.packing == "documents" else s.packing} if s.shape == "text" else {}),
                 "rows_per_epoch": round(s.items_per_epoch, 3)}
                for s in self.sources]


def parse_data_specs(specs: Sequence[str | tuple[str | Path, float]]) -> list[tuple[str, float]]:
    """`["a.jsonl:0.75", ("b.jsonl", 0.25)]` -> `[("a.jsonl", 0.75), ("b.jsonl", 0.25)]`."""
    out = []
    for spec in specs:
        if isinstance(spec, (tuple, list)):
            path, weight = str(spec[0]), float(spec[1])
            if not weight > 0 or not math.isfinite(weight):
                raise UsageError(f"data weight for {path} must be positive (got {weight})")
        else:
            path, weight = parse_weighted_spec(str(spec))
        out.append((path, weight))
    return out


def build_stream(tokenizer, specs: Sequence[str | tuple[str | Path, float]], max_length: int,
                 batch_size: int, seed: int = 0, *, name: str = "data",
                 packing: str = DEFAULT_PACKING) -> BatchStream:
    """Read, tokenise and mix the files in `specs` into an endless `BatchStream`.

    `specs` are `PATH[:WEIGHT]` strings or `(path, weight)` pairs. `max_length` is the row
    length of text files (laid out by `packing`, module doc) and the longest prompt/completion
    example allowed. All errors are raised here, before any training starts.
    """
    if packing not in PACKING_MODES:
        raise UsageError(f"--packing must be one of {', '.join(PACKING_MODES)} "
                         f"(got {packing!r})")
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2 (got {max_length})")
    parsed = parse_data_specs(specs)
    if not parsed:
        raise UsageError(f"{name}: no data files given")
    ensure_special_tokens(tokenizer)
    key = stream_key(name)
    sources = [load_source(tokenizer, path, max_length=max_length, weight=w, seed=seed,
                           index=key * 1000 + i, packing=packing)
               for i, (path, w) in enumerate(parsed)]
    return BatchStream(sources, batch_size, seed, tokenizer.pad_token_id, name=name)


def fit_packing(streams: dict[str, Any], models: Sequence[torch.nn.Module]) -> bool:
    """Make `streams` safe for `models`: if a stream packs documents and some model does not
    honour packed position ids (`packing_supported`), that stream gives one document per row
    from now on (a note is logged). Returns whether packing stays on."""
    packed = [s for s in streams.values() if getattr(s, "packs_documents", False)
              and not getattr(s, "padded_documents", False)]
    if not packed or all(packing_supported(m) for m in models):
        return True
    for stream in packed:
        stream.pad_documents()
    log.info("note: this model does not keep packed documents apart (its attention ignores "
             "restarting position ids), so each document gets a row of its own (padding) "
             "instead of --packing documents")
    return False
