"""Turning records into token tensors: packing, prompt masking, mixing (one module for all).

Every command that trains reads its examples through `build_stream`:

- `{"text": ...}` files are language-model data: each document is tokenised (with the
  tokenizer's own special tokens, e.g. BOS) and followed by EOS. How documents become rows
  of at most `max_length` tokens is `packing`:
    - `documents` (the default): whole documents share a row, best fit, and each document
      sees only itself: its position ids restart at 0 and the label of its first token is
      ignored, so transformers gives it block-diagonal causal attention (its packed-sequence
      masks, found from the restarting `position_ids`) and it gets exactly the logits and
      loss it gets alone. A document longer than a row is cut into row-sized pieces.
      No padding but the little room at the end of a row that no document fits.
    - `concat`: documents are concatenated in a shuffled order and cut into blocks of exactly
      `max_length` tokens; a block may straddle two documents (and two epochs), which then
      attend to each other. Usual for long-document pretraining; wrong for short records.
    - `none`: one document (or piece) per row, padded to the longest row of the batch.
  Labels equal the ids (the causal shift happens in the loss) except where ignored.
- `{"prompt": ..., "completion": ...}` files (`answer` is accepted for `completion`): one
  example per row whatever `packing`, labels `IGNORE_INDEX` on prompt tokens; batches are
  padded to their longest example (right padding, labels `IGNORE_INDEX` and `attention_mask`
  0 on padding). Prompt and completion are tokenised as lm-evaluation-harness tokenises a
  context and its continuation (`encode_pairs`): the prompt's trailing whitespace moves to
  the completion and the whole text is tokenised once, so `"12 + 7 = "` + `"19"` trains
  `" 19"`, the token a BPE tokenizer reads there, as scoring and generation see it.
- Several files mix with weights (`--data a.jsonl:0.75 --data b.jsonl:0.25`): each example of
  the stream comes from file i with probability w_i / sum(w).

Batches hold `input_ids`, `labels`, `position_ids` and `attention_mask` (1 on real tokens,
0 on padding; for counting and masking, not for the model). Models get `model_inputs(batch)`:
ids and position ids, no attention mask and no KV cache, which is what makes transformers
separate packed documents; right padding needs no mask under causal attention (no real token
sees the padding after it). A model that does not honour packed position ids (checked by
`packing_supported`, a three-forward probe) gets one document per row instead
(`BatchStream.pad_documents`): the same tokens, labels and loss, with padding.

A `BatchStream` yields batches forever and is a pure function of (data, seed, position): the
k-th global micro-batch is the same whatever happened before, so `state_dict()` (the position)
is all that resuming needs. Under several processes each process takes its own slice of every
global micro-batch (`shard`), so N processes with batch B see exactly the examples one
process sees with batch N * B.

`ensure_special_tokens`, `encode_text` (tokenisation in bounded pieces), `split_pair`,
`encode_pairs` and `encode_prompt_completion` are shared with evaluation.
"""

from undo_cli.data.batches import (
    Batch,
    BatchStream,
    build_stream,
    collate,
    fit_packing,
    model_inputs,
    packing_supported,
    parse_data_specs,
    unpack_documents,
)
from undo_cli.data.sources import (
    TRAINABLE_SHAPES,
    CompletionSource,
    Item,
    TextSource,
    best_fit_rows,
    encode_pairs,
    encode_prompt_completion,
    encode_text,
    ensure_special_tokens,
    load_source,
    split_pair,
)
from undo_cli.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX", "TRAINABLE_SHAPES", "Batch", "BatchStream", "CompletionSource", "Item",
    "TextSource", "best_fit_rows", "build_stream", "collate", "encode_pairs",
    "encode_prompt_completion", "encode_text", "ensure_special_tokens", "fit_packing",
    "load_source", "model_inputs", "packing_supported", "parse_data_specs", "split_pair",
    "unpack_documents",
]
