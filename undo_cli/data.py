"""Turning records into token tensors: packing, prompt masking, mixing (one module for all).

Every command that trains reads its examples through `build_stream`:

- `{"text": ...}` files are language-model data: each document is tokenised (with the
  tokenizer's own special tokens, e.g. BOS) and followed by EOS, documents are concatenated
  in a shuffled order and cut into blocks of exactly `max_length` tokens. No padding, no
  dropped tail: the token stream simply continues into the next epoch (reshuffled), so a block
  may straddle two epochs. `attention_mask` is all ones and `labels == input_ids`.
- `{"prompt": ..., "completion": ...}` files (`answer` is accepted for `completion`): one
  example per record, labels `IGNORE_INDEX` on prompt tokens; batches are padded to their
  longest example (right padding, labels `IGNORE_INDEX` and `attention_mask` 0 on padding).
- Several files mix with weights (`--data a.jsonl:0.75 --data b.jsonl:0.25`): each example of
  the stream comes from file i with probability w_i / sum(w).

A `BatchStream` yields batches forever and is a pure function of (data, seed, position): the
k-th global micro-batch is the same whatever happened before, so `state_dict()` (the position)
is all that resuming needs. Under several processes each process takes its own slice of every
global micro-batch (`shard`), so N processes with batch B see exactly the examples one
process sees with batch N * B.

Owned by the training-engine work; `ensure_special_tokens` and `encode_prompt_completion` are
shared with evaluation.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from undo_cli.cli.common import info
from undo_cli.errors import DataError, UsageError
from undo_cli.records import Record, completion_of, file_shape, parse_weighted_spec, read_records

IGNORE_INDEX = -100
TRAINABLE_SHAPES = ("text", "completion")
Batch = dict[str, torch.Tensor]

# Distinct constants mixed into the seeds of the independent random streams below.
_PERMUTATION_KEY = 104729
_MIXING_KEY = 7919
_MIX_CHUNK = 1024


def ensure_special_tokens(tokenizer) -> None:
    """Make sure the tokenizer has an EOS and a PAD token, falling back sanely (and saying so).

    PAD falls back to EOS; a tokenizer with neither gets EOS = PAD = its last token.
    """
    if tokenizer.eos_token_id is None:
        fallback = tokenizer.pad_token or tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
        info(f"note: the tokenizer has no EOS token; using {fallback!r}")
        tokenizer.eos_token = fallback
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def encode_prompt_completion(tokenizer, prompt: str, completion: str, *,
                             add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + completion` and labels with the prompt masked out.

    The prompt is encoded with the tokenizer's special tokens (e.g. BOS), the completion
    without; EOS is appended to the completion when `add_eos`. Labels are `IGNORE_INDEX` on
    prompt tokens and equal to the ids on completion tokens (the causal shift happens in the
    loss).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = list(prompt_ids) + list(completion_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    return ids, labels


# --------------------------------------------------------------------------- sources


def _text_of(record: Record, field: str) -> str:
    value = record.data.get(field)
    if value is None:
        raise record.error(f"'{field}' is missing or null")
    if isinstance(value, (dict, list)):
        raise record.error(f"'{field}' must be a string, not {type(value).__name__}")
    return str(value)


class TextSource:
    """A `{"text"}` file as one token stream: documents + EOS, cut into `block`-token blocks.

    Epoch e concatenates the documents in the order of a permutation seeded by
    (seed, index, e); epochs follow one another without a gap, so block k is
    tokens [k * block, (k + 1) * block) of that endless stream.
    """

    shape = "text"

    def __init__(self, path: str, weight: float, docs: list[np.ndarray], block: int,
                 seed: int, index: int):
        self.path, self.weight, self.block = path, weight, block
        self.seed, self.index = seed, index
        self.docs = docs
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def items_per_epoch(self) -> float:
        return self.epoch_tokens / self.block

    @property
    def mean_item_tokens(self) -> float:
        return float(self.block)

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            order = _permutation(self.seed, self.index, e, len(self.docs))
            self._epochs[e] = np.concatenate([self.docs[i] for i in order])
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def item(self, k: int) -> tuple[np.ndarray, None]:
        """Block `k` (token ids; labels are the ids themselves)."""
        out = np.empty(self.block, dtype=np.int64)
        pos, filled = k * self.block, 0
        while filled < self.block:
            e, off = divmod(pos, self.epoch_tokens)
            take = min(self.block - filled, self.epoch_tokens - off)
            out[filled:filled + take] = self._epoch(e)[off:off + take]
            filled += take
            pos += take
        return out, None


class CompletionSource:
    """A `{"prompt", "completion"}` file: one example per record, prompt tokens masked."""

    shape = "completion"

    def __init__(self, path: str, weight: float, ids: list[np.ndarray],
                 labels: list[np.ndarray], seed: int, index: int):
        self.path, self.weight = path, weight
        self.seed, self.index = seed, index
        self.ids, self.labels = ids, labels
        self.epoch_tokens = int(sum(len(x) for x in ids))
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def items_per_epoch(self) -> float:
        return float(len(self.ids))

    @property
    def mean_item_tokens(self) -> float:
        return self.epoch_tokens / len(self.ids)

    def item(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        e, i = divmod(k, len(self.ids))
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, _permutation(self.seed, self.index, e, len(self.ids)))
        j = int(self._perm[1][i])
        return self.ids[j], self.labels[j]


Source = TextSource | CompletionSource


def _permutation(seed: int, index: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTATION_KEY, index, epoch]).permutation(n)


def _stream_key(name: str) -> int:
    """A stable number for a stream name, so that e.g. forget and retain files of the same
    size are not shuffled in lockstep."""
    return zlib.crc32(name.encode())


def _batched(seq: list, size: int = 1024) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for chunk in _batched(texts):
        ids.extend(tokenizer(chunk, add_special_tokens=special)["input_ids"])
    return ids


def load_source(tokenizer, path: str | Path, *, max_length: int, weight: float = 1.0,
                seed: int = 0, index: int = 0) -> Source:
    """Read and tokenise one data file (see the module docstring for the two shapes).

    Raises `DataError` naming the file (and line) for unreadable files, unknown formats,
    records without the expected fields, empty data sets, multiple-choice records, and
    prompt/completion records longer than `max_length` (they cannot be split).
    """
    ensure_special_tokens(tokenizer)
    records = read_records(path)
    shape = file_shape(records)
    if shape not in TRAINABLE_SHAPES:
        raise DataError(f"records of shape '{shape}' (question/choices/answer) are for "
                        "evaluation; training data needs 'text' or 'prompt' + 'completion'",
                        path)
    eos = tokenizer.eos_token_id
    if shape == "text":
        texts = [_text_of(r, "text") for r in records]
        docs = []
        for ids in _encode(tokenizer, texts, special=True):
            if not ids or ids[-1] != eos:
                ids = list(ids) + [eos]
            docs.append(np.asarray(ids, dtype=np.int64))
        return TextSource(str(path), weight, docs, max_length, seed, index)
    prompts = [_text_of(r, "prompt") for r in records]
    completions = [completion_of(r) for r in records]
    prompt_ids = _encode(tokenizer, prompts, special=True)
    completion_ids = _encode(tokenizer, completions, special=False)
    all_ids, all_labels = [], []
    for rec, p, c in zip(records, prompt_ids, completion_ids, strict=True):
        c = list(c) + [eos]
        n = len(p) + len(c)
        if n > max_length:
            raise rec.error(f"prompt + completion is {n} tokens, longer than --max-length "
                            f"{max_length}; a prompt/completion record cannot be split: raise "
                            "--max-length or shorten the record")
        all_ids.append(np.asarray(list(p) + c, dtype=np.int64))
        all_labels.append(np.asarray([IGNORE_INDEX] * len(p) + c, dtype=np.int64))
    return CompletionSource(str(path), weight, all_ids, all_labels, seed, index)


# --------------------------------------------------------------------------- batching


def collate(items: Sequence[tuple[np.ndarray, np.ndarray | None]], pad_id: int) -> Batch:
    """Right-pad `(ids, labels)` pairs to the longest; `labels=None` means labels = ids."""
    width = max(len(ids) for ids, _ in items)
    n = len(items)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, lab) in enumerate(items):
        m = len(ids)
        input_ids[row, :m] = ids
        attention[row, :m] = 1
        labels[row, :m] = ids if lab is None else lab
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


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

    Iterating yields `{"input_ids", "attention_mask", "labels"}` CPU tensors of this process's
    `batch_size` examples. `position` counts global micro-batches drawn; `state_dict()` /
    `load_state_dict()` save and restore it. `last_tokens` is the number of (non-padding)
    tokens in the last *global* micro-batch, the same on every process.
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
        self._mixer = _Mixer([s.weight for s in self.sources], [seed, _stream_key(name)])

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
        items, total = [], 0
        for j in range(first, first + g):
            s, k = self._mixer.locate(j)
            source = self.sources[s]
            if j in mine:
                item = source.item(k)
                items.append(item)
                total += len(item[0])
            elif isinstance(source, TextSource):
                total += source.block
            else:
                total += len(source.item(k)[0])
        self.position += 1
        self.last_tokens = total
        return collate(items, self.pad_id)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def describe(self) -> list[dict]:
        """One entry per source, for manifests: path, weight, shape, records, tokens."""
        total = sum(s.weight for s in self.sources)
        return [{"path": s.path, "weight": s.weight / total, "shape": s.shape,
                 "records": len(s), "tokens_per_epoch": s.epoch_tokens}
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
                 batch_size: int, seed: int = 0, *, name: str = "data") -> BatchStream:
    """Read, tokenise and mix the files in `specs` into an endless `BatchStream`.

    `specs` are `PATH[:WEIGHT]` strings or `(path, weight)` pairs. `max_length` is the block
    size of text files and the longest prompt/completion example allowed. All errors are
    raised here, before any training starts.
    """
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2 (got {max_length})")
    parsed = parse_data_specs(specs)
    if not parsed:
        raise UsageError(f"{name}: no data files given")
    ensure_special_tokens(tokenizer)
    key = _stream_key(name)
    sources = [load_source(tokenizer, path, max_length=max_length, weight=w, seed=seed,
                           index=key * 1000 + i)
               for i, (path, w) in enumerate(parsed)]
    return BatchStream(sources, batch_size, seed, tokenizer.pad_token_id, name=name)
