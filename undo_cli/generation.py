"""Batched greedy generation that gives exactly the answers of one-prompt-at-a-time generation.

`greedy_generate` left-pads a batch of prompts (sorted by length, so batches hold prompts of
similar lengths), passes the attention mask to `model.generate` (which derives the position
ids from it, so every row sees the positions it would see alone) and stops each row at EOS or
once its text holds a stop string (`until`, lm-evaluation-harness's name; default a newline).
The answer of a row is its generated text, special tokens dropped, without the row's
`prefix` (whitespace its prompt gave up to the answer, `undo_cli.data.split_pair`) and cut at
the first stop string: the same string that `model.generate` on that prompt alone, decoded
and cut, gives. Padded keys are masked out exactly, so only floating-point reduction order
can differ between a row alone and a row in a batch; tests check the answers are identical
on tiny models.

Batch size: a fixed number of rows, or (`batch_size=None`) as many rows as fit a token budget
(`GENERATION_TOKEN_BUDGET` prompt + new tokens per batch, at most `MAX_ROWS` rows). On a CUDA
out-of-memory error the batch is halved and retried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from undo_cli.errors import UndoError

GENERATION_TOKEN_BUDGET = 32768  # prompt + generated tokens per batch when batch_size is None
MAX_ROWS = 256  # rows per batch when batch_size is None

_T = TypeVar("_T")

DEFAULT_UNTIL = ("\n",)

_token_text_cache: dict[int, tuple[Any, int, list[str]]] = {}


def unwrap_model(model):
    """The Hugging Face model inside a DistributedDataParallel wrapper (else `model`)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_max_length(model, cap: int | None = 4096) -> int:
    """The longest sequence the model accepts (from its config), at most `cap`."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap) if cap else value
    return cap or 2048


def stop_strings(until: Sequence[str] | None) -> tuple[str, ...]:
    """The stop strings of `--until` values: `\\n` and `\\t` read as newline and tab
    (shells pass them literally), empty strings dropped; None -> `DEFAULT_UNTIL`."""
    if until is None:
        return DEFAULT_UNTIL
    out = []
    for text in until:
        text = text.replace("\\n", "\n").replace("\\t", "\t")
        if text and text not in out:
            out.append(text)
    return tuple(out)


def _token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id (cached per tokenizer)."""
    size = len(tokenizer)
    cached = _token_text_cache.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer and cached[1] == size:
        return cached[2]
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    _token_text_cache[id(tokenizer)] = (tokenizer, size, texts)
    return texts


def tokens_containing(tokenizer, chars: str) -> frozenset[int]:
    """Ids of the tokens whose decoded text contains any of `chars`."""
    return frozenset(i for i, text in enumerate(_token_texts(tokenizer))
                     if any(c in text for c in chars))


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose decoded text contains a newline."""
    return tokens_containing(tokenizer, "\n")


def strip_prefix_and_cut(text: str, prefix: str, until: Sequence[str]) -> str:
    """`text` without a leading `prefix`, cut at the first occurrence of each stop string (as
    lm-eval cuts: `text.split(stop)[0]` for each)."""
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any EOS ids of the model's generation config."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        candidates.append(gen_config.eos_token_id)
    for value in candidates:
        values = value if isinstance(value, (list, tuple)) else [value]
        ids.extend(int(v) for v in values if v is not None and int(v) not in ids)
    return ids


def cut_answer(tokenizer, token_ids: Sequence[int], stop_ids: Sequence[int] = (),
               until: Sequence[str] = DEFAULT_UNTIL, prefix: str = "") -> str:
    """Generated ids -> text: cut at the first stop id (EOS), special tokens dropped, then
    `strip_prefix_and_cut`."""
    stop = set(stop_ids)
    kept: list[int] = []
    for t in token_ids:
        if t in stop:
            break
        kept.append(int(t))
    text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return strip_prefix_and_cut(text, prefix, until)


def _stop_criteria(tokenizer, width: int, until: Sequence[str], prefixes: Sequence[str]):
    """A stopping criterion: a row is done once its generated text (after its prefix) holds a
    stop string. Only rows whose last token could end one (it holds a stop string's last
    character) are decoded."""

    suspects = tokens_containing(tokenizer, "".join(s[-1] for s in until))

    class StopAtStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if token not in suspects:
                    continue
                text = tokenizer.decode(input_ids[row, width:].tolist(),
                                        skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
                prefix = prefixes[row]
                if prefix and text.startswith(prefix):
                    text = text[len(prefix):]
                done[row] = any(stop in text for stop in until)
            return done

    return StopAtStrings()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator out-of-memory error."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or "out of memory" in str(error).lower()


def run_batched(items: Sequence[_T], rows_for: Callable[[Sequence[_T]], int],
                run: Callable[[Sequence[_T]], None], fixed_rows: int | None) -> None:
    """Call `run` on consecutive slices of `items`; halve the slice on out-of-memory.

    `rows_for(rest)` says how many rows to take from the remaining items when `fixed_rows`
    is None.
    """
    start = 0
    limit: int | None = None
    while start < len(items):
        rows = fixed_rows or rows_for(items[start:])
        if limit is not None:
            rows = min(rows, limit)
        rows = max(1, rows)
        chunk = items[start:start + rows]
        try:
            run(chunk)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            if rows == 1:
                raise UndoError("out of memory evaluating a single sequence; use a shorter "
                                "--max-length or a smaller model/dtype") from e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            limit = rows // 2
            continue
        start += len(chunk)


def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 32, batch_size: int | None = None,
                    stop_at_newline: bool = True, max_length: int | None = None,
                    device: torch.device | str | None = None,
                    until: Sequence[str] | None = None,
                    prefixes: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to tokenised prompts, batched; the same strings as one prompt at a time.

    Each answer is the generated text up to the first EOS, special tokens dropped, without
    the prompt's `prefixes[i]` and cut at the first of the stop strings `until` (default a
    newline; `stop_at_newline=False` with no `until`: EOS only); whitespace is kept. A prompt
    longer than `max_length - max_new_tokens` (default: the model's maximum length) keeps its
    last tokens. The caller sets eval mode and `torch.no_grad` (see
    `evaluate.evaluate_model`).
    """

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    model = unwrap_model(model)
    device = torch.device(device) if device is not None else model_device(model)
    limit = max_length or model_max_length(model, cap=None)
    keep = max(1, limit - max_new_tokens)
    prompts = [list(p)[-keep:] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("an empty prompt cannot be generated from (it has no tokens)")
    until = tuple(until) if until is not None else DEFAULT_UNTIL if stop_at_newline else ()
    prefixes = list(prefixes) if prefixes is not None else [""] * len(prompts)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
        pad_token_id=pad, use_cache=True, temperature=None, top_p=None, top_k=None,
    )
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    answers: list[str] = [""] * len(prompts)

    def rows_for(rest: Sequence[int]) -> int:
        return min(MAX_ROWS, GENERATION_TOKEN_BUDGET // (len(prompts[rest[0]]) + max_new_tokens))

    def run(chunk: Sequence[int]) -> None:
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            p = prompts[i]
            input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        criteria = (StoppingCriteriaList([_stop_criteria(tokenizer, width, until,
                                                          [prefixes[i] for i in chunk])])
                    if until else None)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=config, stopping_criteria=criteria)
        for row, i in enumerate(chunk):
            answers[i] = cut_answer(tokenizer, out[row, width:].tolist(), stop_ids=eos,
                                    until=until, prefix=prefixes[i])

    run_batched(order, rows_for, run, batch_size)
    return answers
