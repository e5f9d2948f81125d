"""Turning records into token tensors: packing, prompt masking, mixing (one module for all).

Owned by the training-engine work; the helpers below are shared with evaluation.
"""

from __future__ import annotations

from undo_cli.cli.common import info

IGNORE_INDEX = -100


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
