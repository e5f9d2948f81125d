"""Data files as token sources: tokenising `{"text"}` and `{"prompt", "completion"}` records
and laying text out in rows (`packing`: documents, concat, none). See `undo_cli.data`."""

from __future__ import annotations

import bisect
import contextlib
import logging
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from undo_cli.errors import DataError, UsageError
from undo_cli.losses import IGNORE_INDEX
from undo_cli.options import DEFAULT_PACKING, PACKING_MODES
from undo_cli.records import completion_of, file_shape, read_records, text_field

log = logging.getLogger(__name__)
TRAINABLE_SHAPES = ("text", "completion")
Item = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]  # ids, labels, positions

# A distinct constant mixed into the seeds of the per-epoch permutations.
_PERMUTATION_KEY = 104729


def ensure_special_tokens(tokenizer) -> None:
    """Make sure the tokenizer has an EOS and a PAD token, falling back sanely (and saying so).

    PAD falls back to EOS; a tokenizer with neither gets EOS = PAD = its last token.
    """
    if tokenizer.eos_token_id is None:
        fallback = tokenizer.pad_token or tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
        log.info("note: the tokenizer has no EOS token; using %r", fallback)
        tokenizer.eos_token = fallback
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's convention: whitespace that ends the context moves to the start
    of the continuation (`"12 + 7 = "`, `"19"` -> `"12 + 7 ="`, `" 19"`), so that a BPE
    tokenizer reads the continuation as the word it is (`" 19"` is one token, `"19"` after a
    lone space another) and the context never ends in a stray whitespace token."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(context ids, continuation ids)` of each pair, as lm-evaluation-harness's
    `_encode_pair` makes them: whitespace moved (`split_pair`), then the whole text
    `context + continuation` tokenised once and cut after the context's own tokens. The
    context gets the tokenizer's special prefix (e.g. BOS), the continuation none. For a
    tokenizer that splits text at every character this equals encoding the two apart."""
    pairs = [split_pair(c, k) for c, k in zip(contexts, continuations, strict=True)]
    affixes = _special_affixes(tokenizer)
    plain_contexts = _encode(tokenizer, [c for c, _ in pairs], special=False)
    wholes = _encode(tokenizer, [c + k for c, k in pairs], special=affixes is None)
    out = []
    for (context, _), plain, whole in zip(pairs, plain_contexts, wholes):
        if affixes is None:  # special tokens we cannot place: encode with them, as lm-eval
            ctx = np.asarray(encode_text(tokenizer, context, special=True), dtype=np.int64)
        else:
            ctx = np.concatenate([np.asarray(affixes[0], dtype=np.int64), plain])
            whole = np.concatenate([np.asarray(affixes[0], dtype=np.int64), whole])
        out.append((ctx, whole[len(ctx):]))
    return out


def encode_prompt_completion(tokenizer, prompt: str, completion: str, *,
                             add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + completion` and labels with the prompt masked out.

    Tokenised as `encode_pairs` does (lm-eval's convention: the prompt's trailing whitespace
    belongs to the completion; the prompt gets the tokenizer's special prefix such as BOS);
    EOS is appended to the completion when `add_eos`. Labels are `IGNORE_INDEX` on prompt
    tokens and equal to the ids on completion tokens (the causal shift happens in the loss).
    """
    [(prompt_ids, completion_ids)] = encode_pairs(tokenizer, [prompt], [completion])
    completion_ids = completion_ids.tolist()
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = prompt_ids.tolist() + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, labels


class TextSource:
    """A `{"text"}` file: documents (tokens + EOS) laid out in rows by `packing` (module doc).

    Every mode is a pure function of (seed, index, epoch): epoch e visits the documents in
    the order of a permutation seeded by (seed, index, e), so item k is the same whatever was
    drawn before.
    """

    shape = "text"

    def __init__(self, path: str, weight: float, docs: list[np.ndarray], block: int,
                 seed: int, index: int, packing: str = DEFAULT_PACKING):
        if packing not in PACKING_MODES:
            raise UsageError(f"--packing must be one of {', '.join(PACKING_MODES)} "
                             f"(got {packing!r})")
        self.path, self.weight, self.block = path, weight, block
        self.seed, self.index, self.packing = seed, index, packing
        self.docs = docs
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        if packing != "concat":
            # A document longer than a row is cut into row-sized pieces, each a document of
            # its own (positions restart; its first token is not predicted).
            self.pieces = [d[i:i + block] for d in docs for i in range(0, len(d), block)]
            self.piece_lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        self._epochs: OrderedDict[int, Any] = OrderedDict()
        self._rows_before = [0]  # documents mode: rows of epochs 0..e-1

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def items_per_epoch(self) -> float:
        if self.packing == "concat":
            return self.epoch_tokens / self.block
        if self.packing == "none":
            return float(len(self.pieces))
        return float(len(self._epoch(0)[1]) - 1)

    @property
    def mean_item_tokens(self) -> float:
        return self.epoch_tokens / self.items_per_epoch

    def _epoch(self, e: int):
        """concat: the epoch's token stream; none: its piece order; documents: (piece order,
        row offsets into it)."""
        if e not in self._epochs:
            if self.packing == "concat":
                order = _permutation(self.seed, self.index, e, len(self.docs))
                value: Any = np.concatenate([self.docs[i] for i in order])
            else:
                order = _permutation(self.seed, self.index, e, len(self.pieces))
                value = order if self.packing == "none" else best_fit_rows(
                    self.piece_lengths[order], self.block, order)
            self._epochs[e] = value
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _locate_row(self, k: int) -> tuple[int, int]:
        """(epoch, row within it) of documents-mode item `k`."""
        while self._rows_before[-1] <= k:
            e = len(self._rows_before) - 1
            self._rows_before.append(self._rows_before[-1] + len(self._epoch(e)[1]) - 1)
        e = int(np.searchsorted(self._rows_before, k, side="right")) - 1
        return e, k - self._rows_before[e]

    def _row_pieces(self, k: int) -> list[np.ndarray]:
        if self.packing == "none":
            e, i = divmod(k, len(self.pieces))
            return [self.pieces[int(self._epoch(e)[i])]]
        e, r = self._locate_row(k)
        order, offsets = self._epoch(e)
        return [self.pieces[int(j)] for j in order[offsets[r]:offsets[r + 1]]]

    def item_tokens(self, k: int) -> int:
        """Tokens of item `k` (without building it)."""
        if self.packing == "concat":
            return self.block
        return sum(len(p) for p in self._row_pieces(k))

    def item_targets(self, k: int) -> int:
        """Predicted tokens of item `k`: every token but the first of each document."""
        if self.packing == "concat":
            return self.block - 1
        pieces = self._row_pieces(k)
        return sum(len(p) for p in pieces) - len(pieces)

    def item(self, k: int) -> Item:
        """Row `k`: (token ids, labels, position ids)."""
        if self.packing == "concat":
            out = np.empty(self.block, dtype=np.int64)
            pos, filled = k * self.block, 0
            while filled < self.block:
                e, off = divmod(pos, self.epoch_tokens)
                take = min(self.block - filled, self.epoch_tokens - off)
                out[filled:filled + take] = self._epoch(e)[off:off + take]
                filled += take
                pos += take
            return out, out, np.arange(self.block, dtype=np.int64)
        pieces = self._row_pieces(k)
        ids = np.concatenate(pieces)
        labels = ids.copy()
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        labels[starts] = IGNORE_INDEX  # no document predicts the next one's first token
        positions = np.concatenate([np.arange(len(p), dtype=np.int64) for p in pieces])
        return ids, labels, positions


def best_fit_rows(lengths: np.ndarray, capacity: int, order: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pack documents of `lengths` (each <= `capacity`), taken in the given order, into rows
    of at most `capacity` tokens, best fit: each document goes into the open row with the
    least room that still holds it, or opens a new row. Returns `(order', offsets)`: row r
    holds the documents `order'[offsets[r]:offsets[r + 1]]` (`order'` is `order` regrouped by
    row; rows keep the order in which they were opened). No document is split, and rows are
    nearly full: only the leftover room of rows that no later document fits is lost.
    """
    smallest = int(lengths.min()) if len(lengths) else 1
    free: list[tuple[int, int]] = []  # (room left, row), sorted; rows no document fits leave
    rows: list[list[int]] = []
    for i, n in enumerate(lengths.tolist()):
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        room -= n
        if room >= smallest:
            bisect.insort(free, (room, r))
    flat = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(row) for row in rows])
    return order[flat], offsets


class CompletionSource:
    """A `{"prompt", "completion"}` file: one example per record, prompt tokens masked."""

    shape = "completion"

    def __init__(self, path: str, weight: float, ids: list[np.ndarray],
                 labels: list[np.ndarray], seed: int, index: int):
        self.path, self.weight = path, weight
        self.seed, self.index = seed, index
        self.ids, self.labels = ids, labels
        self.targets = [int(np.count_nonzero(lab[1:] != IGNORE_INDEX)) for lab in labels]
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

    def _index(self, k: int) -> int:
        e, i = divmod(k, len(self.ids))
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, _permutation(self.seed, self.index, e, len(self.ids)))
        return int(self._perm[1][i])

    def item_tokens(self, k: int) -> int:
        return len(self.ids[self._index(k)])

    def item_targets(self, k: int) -> int:
        return self.targets[self._index(k)]

    def item(self, k: int) -> Item:
        j = self._index(k)
        return self.ids[j], self.labels[j], None


Source = TextSource | CompletionSource


def _permutation(seed: int, index: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTATION_KEY, index, epoch]).permutation(n)


def stream_key(name: str) -> int:
    """A stable number for a stream name, so that e.g. forget and retain files of the same
    size are not shuffled in lockstep."""
    return zlib.crc32(name.encode())


# Tokenisation in bounded pieces: a tokenizer's output for one call is many times the size of
# its input (token strings, offsets, masks), so a 50 MB record tokenised at once took ~10 GB.
TEXT_PIECE_CHARS = 1 << 16  # a longer text is cut (at whitespace) into pieces of about this
BATCH_CHARS = 1 << 20  # characters per tokenizer call


def _pieces(text: str, size: int = TEXT_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut just before a
    whitespace character where there is one (so words stay whole)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _special_affixes(tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer puts before and after a text with its special tokens (e.g. BOS
    before), found by encoding a probe both ways; None if they cannot be told apart."""
    cached = getattr(tokenizer, "_undo_affixes", None)
    if cached is not None and cached[0] == id(tokenizer):  # not a copy's (deepcopy keeps it)
        return cached[1]
    probe = "a b 1"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    found = None
    for i in range(len(full) - len(plain) + 1):
        if plain and full[i:i + len(plain)] == plain:
            found = (full[:i], full[i + len(plain):])
            break
    with contextlib.suppress(AttributeError):  # a tokenizer that takes no attributes
        tokenizer._undo_affixes = (id(tokenizer), found)
    return found


def encode_text(tokenizer, text: str, *, special: bool) -> list[int]:
    """Token ids of `text` (with the tokenizer's special tokens if `special`), tokenised in
    pieces when it is long (`TEXT_PIECE_CHARS`): memory stays bounded, and pieces are cut at
    whitespace so the ids equal one call's for ordinary tokenizers."""
    if len(text) <= TEXT_PIECE_CHARS:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    affixes = _special_affixes(tokenizer) if special else ([], [])
    if affixes is None:  # special tokens we cannot place: one call
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    ids = list(affixes[0])
    for piece in _pieces(text):
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids + list(affixes[1])


def _encode(tokenizer, texts: list[str], special: bool) -> list[np.ndarray]:
    """Token ids of each text, as int64 arrays: short texts in batches of about
    `BATCH_CHARS` characters per tokenizer call, long ones piece by piece."""
    out: list[np.ndarray | None] = [None] * len(texts)
    batch: list[int] = []
    chars = 0

    def flush() -> None:
        nonlocal chars
        if batch:
            encoded = tokenizer([texts[i] for i in batch], add_special_tokens=special)
            for i, ids in zip(batch, encoded["input_ids"], strict=True):
                out[i] = np.asarray(ids, dtype=np.int64)
            batch.clear()
        chars = 0

    for i, text in enumerate(texts):
        if len(text) > TEXT_PIECE_CHARS:
            out[i] = np.asarray(encode_text(tokenizer, text, special=special), dtype=np.int64)
            continue
        batch.append(i)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= 1024:
            flush()
    flush()
    return out  # type: ignore[return-value]


def load_source(tokenizer, path: str | Path, *, max_length: int, weight: float = 1.0,
                seed: int = 0, index: int = 0, packing: str = DEFAULT_PACKING) -> Source:
    """Read and tokenise one data file (see the module docstring for the two shapes and the
    `packing` of text).

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
        texts = [text_field(r, "text") for r in records]
        docs = []
        for ids in _encode(tokenizer, texts, special=True):
            if not len(ids) or ids[-1] != eos:
                ids = np.append(ids, np.int64(eos))
            docs.append(ids)
        return TextSource(str(path), weight, docs, max_length, seed, index, packing)
    prompts = [text_field(r, "prompt") for r in records]
    completions = [completion_of(r) for r in records]
    all_ids, all_labels = [], []
    for rec, (p, c) in zip(records, encode_pairs(tokenizer, prompts, completions), strict=True):
        c = np.append(c, np.int64(eos))
        n = len(p) + len(c)
        if n > max_length:
            raise rec.error(f"prompt + completion is {n} tokens, longer than --max-length "
                            f"{max_length}; a prompt/completion record cannot be split: raise "
                            "--max-length or shorten the record")
        all_ids.append(np.concatenate([p, c]))
        all_labels.append(np.concatenate([np.full(len(p), IGNORE_INDEX, dtype=np.int64), c]))
    return CompletionSource(str(path), weight, all_ids, all_labels, seed, index)
