"""Decoder layers by number: `--layers 10-15` and its kin, resolved to tensor names (no torch).

A layer range is text such as `10-15`, `3`, `0,2,4-6` or `all` (0-based, both ends of a
range included). It becomes a regular expression matching the names of the tensors of those
decoder layers, by architecture:

- llama, gemma2, gemma, qwen2, mistral, ... (`model_type` in `LAYER_PREFIXES`):
  `model.layers.N.` (a loaded `AutoModelForCausalLM`; names keep any outer prefix);
- gpt2: `transformer.h.N.`; gpt_neox (Pythia, Deep Ignorance): `gpt_neox.layers.N.`;
- any other model: found from its tensor names, which must contain `.layers.N.` or `.h.N.`
  (`layer_prefix`), else the selection is refused with a message saying what the names look
  like.

Used by `undo perturb --layers`, `undo distill --layers` (the in-memory noise),
`--train-layers` and `--hidden-layers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from undo_cli.errors import UsageError
from undo_cli.options.text import layer_numbers as parse_layer_range

__all__ = ["LAYER_PREFIXES", "count_layers", "format_layers", "layer_pattern", "layer_prefix",
           "parse_layer_range", "resolve_layers"]

# The decoder-layer container of each preset architecture (and its close relatives).
LAYER_PREFIXES: dict[str, str] = {
    "llama": "model.layers", "gemma": "model.layers", "gemma2": "model.layers",
    "gemma3_text": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "mistral": "model.layers", "mixtral": "model.layers", "phi3": "model.layers",
    "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
}
_GENERIC = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")


def format_layers(layers: Iterable[int] | None) -> str:
    """(10, 11, 12, 15) -> "10-12,15"; None -> "all"."""
    if layers is None:
        return "all"
    values = sorted(set(layers))
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is not None and (v is None or v != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ",".join(parts)


def layer_prefix(names: Iterable[str], model_type: str | None = None) -> str:
    """The decoder-layer container (`model.layers`, `transformer.h`) of a model with tensor
    `names`: from `LAYER_PREFIXES` for a known `model_type`, else from the names."""
    names = list(names)
    known = LAYER_PREFIXES.get(model_type or "")
    if known is not None and any(f"{known}." in n for n in names):
        return known
    for name in names:
        m = _GENERIC.search(name)
        if m:
            return name[:m.start(3)].rstrip(".")
    examples = ", ".join(names[:4])
    raise UsageError(f"cannot find the decoder layers of this model (model type "
                     f"{model_type or 'unknown'}; tensor names look like {examples}, ...): "
                     "select tensors with --include REGEX instead")


def count_layers(names: Iterable[str], prefix: str) -> int:
    """The number of decoder layers under `prefix` (1 + the highest layer number)."""
    pattern = re.compile(rf"(^|\.){re.escape(prefix)}\.(\d+)\.")
    numbers = [int(m.group(2)) for n in names if (m := pattern.search(n))]
    return max(numbers) + 1 if numbers else 0


def layer_pattern(layers: Iterable[int], prefix: str) -> str:
    """A regular expression (for `re.search`) matching the tensors of `layers` under
    `prefix`: e.g. `(^|\\.)model\\.layers\\.(10|11)\\.`."""
    numbers = "|".join(str(n) for n in sorted(set(layers)))
    return rf"(^|\.){re.escape(prefix)}\.({numbers})\."


def resolve_layers(text: str | None, names: Iterable[str], model_type: str | None = None, *,
                   flag: str = "--layers") -> tuple[tuple[int, ...], str] | None:
    """`(layers, regex)` selecting decoder layers `text` of a model with tensor `names`
    (None for all layers); `UsageError` naming `flag` for a layer the model does not have."""
    layers = parse_layer_range(text, flag)
    if layers is None:
        return None
    names = list(names)
    prefix = layer_prefix(names, model_type)
    n = count_layers(names, prefix)
    if layers[-1] >= n:
        raise UsageError(f"{flag} {text}: the model has {n} decoder layers (0..{n - 1})")
    return layers, layer_pattern(layers, prefix)
