"""Randomly initialised models with locally built tokenizers (`undo init`; no downloads).

Used by tests and examples, and by `undo distill --student random`.
"""

from __future__ import annotations

import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from undo_cli.checkpoint import (
    atomic_output,
    build_manifest,
    check_fits_memory,
    check_output_path,
    fingerprint_data,
    save_layout,
    save_model,
    write_manifest,
)
from undo_cli.errors import UsageError
from undo_cli.options import SaveOptions
from undo_cli.options.commands import InitOptions
from undo_cli.options.text import BPE_NEEDS_DATA, TokenizerSpec, tokenizer_spec
from undo_cli.records import completion_of, read_records, record_shape, text_field

ARCHITECTURES = ("llama", "gemma2", "gpt2", "qwen2", "mistral", "gpt_neox", "phi3")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


@dataclass(frozen=True)
class ModelShape:
    """The size knobs of `undo init`."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_position: int = 256


PRESETS: dict[str, ModelShape] = {
    # ~0.5M parameters: masters the arithmetic task in minutes on 2 CPU cores.
    "tiny": ModelShape(layers=2, hidden=128, heads=4, intermediate=512, max_position=256),
    # ~10M parameters: the size the engine and distillation benchmarks use.
    "small": ModelShape(layers=6, hidden=384, heads=6, intermediate=1024, max_position=512),
}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _wrap(tok, *, split_words: bool):
    """`tok` (a byte-level BPE `tokenizers.Tokenizer`) as a transformers tokenizer with undo's
    special tokens and `<bos>` before every text encoded with special tokens (as Llama's
    tokenizer does), so documents in training and prompts in evaluation start the same way.
    `split_words`: GPT-2's pre-tokenizer split (no token spans two words) before the bytes."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
    )


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A character-level tokenizer: one token per character of `alphabet` (any Unicode
    characters), plus `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3.

    It is a byte-level BPE, so every transformers tokenizer class (including the ones
    AutoTokenizer forces for some model types, e.g. Qwen2) reads it back the same. A character
    of several UTF-8 bytes is built by merges from its bytes, whose pieces are tokens too (never
    produced by text in the alphabet). Characters outside the alphabet become `<unk>` (or such
    byte pieces where they share leading bytes with a character of the alphabet).
    """
    if not alphabet:
        raise UsageError("the tokenizer alphabet is empty")
    to_unicode = _byte_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    merges: list[tuple[str, str]] = []
    for ch in alphabet:
        pieces = [to_unicode[b] for b in ch.encode()]
        if len(pieces) == 1:
            vocab.setdefault(pieces[0], len(vocab))
            continue
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        done = pieces[0]
        for piece in pieces[1:]:
            if done + piece not in vocab:
                vocab[done + piece] = len(vocab)
                merges.append((done, piece))
            done += piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    return _wrap(tok, split_words=False)


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on `texts` with the
    `tokenizers` library, as GPT-2's: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, the 256
    bytes (so any text in any language round-trips), then merges of pairs seen at least twice,
    never across GPT-2's word split. Deterministic: the same texts in the same order give a
    byte-identical tokenizer. (`vocab_size` was checked by `tokenizer_spec`: at least
    `BPE_MIN_VOCAB`.)"""
    if not any(t.strip() for t in texts):
        raise UsageError("--tokenizer-data holds no text to train the tokenizer on")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _wrap(tok, split_words=True)


def record_texts(paths: list[str | Path]) -> list[str]:
    """The text of every record of every file, in order (any `--data` format): a text
    record's text, a prompt/completion pair joined, a question with its choices."""
    texts: list[str] = []
    for path in paths:
        for rec in read_records(path):
            shape = record_shape(rec)
            if shape == "text":
                texts.append(text_field(rec, "text"))
            elif shape == "completion":
                texts.append(text_field(rec, "prompt") + completion_of(rec))
            else:
                choices = rec.data.get("choices")
                choices = choices if isinstance(choices, list) else []
                texts.append("\n".join([text_field(rec, "question"), *map(str, choices)]))
    return texts


def load_tokenizer_spec(spec: str | TokenizerSpec, data: list[str | Path] | None = None):
    """The tokenizer `spec` names (`TokenizerSpec`; text is parsed as `--tokenizer` is): a
    character tokenizer, a BPE trained on the records of `data`, or a tokenizer.json file or
    directory."""
    spec = tokenizer_spec(spec)
    if spec.kind == "char":
        return build_char_tokenizer(DEFAULT_ALPHABET if spec.alphabet is None else spec.alphabet)
    if spec.kind == "bpe":
        if not data:
            raise UsageError(BPE_NEEDS_DATA)
        return train_bpe_tokenizer(record_texts(data), spec.size)
    path = Path(spec)
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {e}") from e


def build_config(arch: str, shape: ModelShape, tokenizer):
    """A transformers config of architecture `arch` and size `shape` for `tokenizer`."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    for name in ("layers", "hidden", "heads", "intermediate", "max_position"):
        value = getattr(shape, name)
        if value < 1:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option} must be positive (got {value})")
    if shape.hidden % shape.heads:
        raise UsageError(f"--hidden {shape.hidden} is not divisible by --heads {shape.heads}")
    vocab = len(tokenizer)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=shape.hidden, n_layer=shape.layers,
                          n_head=shape.heads, n_inner=shape.intermediate,
                          n_positions=shape.max_position, **ids)
    if arch == "gpt_neox":  # Pythia / Deep Ignorance: parallel residual, untied embed_out
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=shape.hidden,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             intermediate_size=shape.intermediate,
                             max_position_embeddings=shape.max_position,
                             tie_word_embeddings=False, **ids)
    common = dict(
        vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate, max_position_embeddings=shape.max_position, **ids,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":  # Zephyr-7B-beta
        return MistralConfig(**common, sliding_window=None)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, original_max_position_embeddings=shape.max_position)
    head_dim = shape.hidden // shape.heads
    return Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                        sliding_window=shape.max_position)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32,
                 what: str = "the model"):
    """A freshly initialised causal LM for `config` (its architecture's own init), seeded.

    `UsageError` with the estimate if it cannot fit in the memory available (checked before
    anything is allocated; `what` names the model in the message)."""
    check_fits_memory(config.to_dict(), torch.empty((), dtype=dtype).element_size(), what)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def describe_shape(shape: ModelShape) -> str:
    """`the model of --layers 2 --hidden 128 ...`: a shape as `undo init`'s flags, for messages."""
    flags = " ".join(f"--{name.replace('_', '-')} {value}"
                     for name, value in asdict(shape).items())
    return f"the model of {flags}"


def resolve_shape(preset: str | None, **overrides: int | None) -> ModelShape:
    """The preset's shape (default `tiny`) with any explicitly given sizes replacing its own."""
    name = preset or "tiny"
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = asdict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelShape(**values)


def count_parameters(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def init_checkpoint(out: str | Path, options: InitOptions = InitOptions(), *,
                    save: SaveOptions = SaveOptions(), overwrite: bool = False) -> dict[str, Any]:
    """`undo init`: write a random model of `options`' architecture and size with its local
    tokenizer to `out` (atomically, with `undo.json`); returns the summary `--json` prints."""
    started = time.time()
    reads = [("--tokenizer", options.tokenizer)] if options.tokenizer.kind == "path" else []
    reads += [("--tokenizer-data", Path(p)) for p in options.tokenizer_data]
    check_output_path(out, overwrite=overwrite, reads=reads)
    shape = resolve_shape(options.preset, layers=options.layers, hidden=options.hidden,
                          heads=options.heads, intermediate=options.intermediate,
                          max_position=options.max_position)
    tok = load_tokenizer_spec(options.tokenizer, options.tokenizer_data)
    model = random_model(build_config(options.arch, shape, tok), seed=options.seed,
                         what=describe_shape(shape))
    n_params = count_parameters(model)
    with atomic_output(out, overwrite=overwrite, reads=reads) as tmp:
        save_model(model, tok, tmp, layout=save_layout(save, None))
        write_manifest(tmp, build_manifest(
            "init", seed=options.seed, wall_time_s=time.time() - started,
            arguments=dict(arch=options.arch, preset=options.preset,
                           tokenizer=options.tokenizer, **asdict(shape),
                           save_dtype=save.save_dtype, max_shard_size=save.max_shard_size,
                           tokenizer_data=[{"path": str(p), "fingerprint": fingerprint_data(p)}
                                           for p in options.tokenizer_data]),
            extra={"parameters": n_params}))
    return {"output": str(out), "arch": options.arch, "parameters": n_params,
            "vocab_size": len(tok), **asdict(shape)}
