"""Decoder-layer ranges (`--layers`, `--train-layers`, `--hidden-layers`) resolved per
architecture."""

from __future__ import annotations

import re

import pytest

from undo_cli.errors import UsageError
from undo_cli.layers import (
    count_layers,
    format_layers,
    layer_prefix,
    parse_layer_range,
    resolve_layers,
)

LLAMA = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.down_proj.weight"
                                        for i in range(16)), "model.norm.weight",
         "lm_head.weight"]
GPT2 = ["transformer.wte.weight", *(f"transformer.h.{i}.attn.c_attn.weight" for i in range(4)),
        "transformer.ln_f.weight"]


@pytest.mark.parametrize(("text", "expected"), [
    ("10-15", (10, 11, 12, 13, 14, 15)), ("3", (3,)), ("0,2,4-5", (0, 2, 4, 5)),
    (" 1 - 2 , 1 ", (1, 2)), ("all", None), ("", None), (None, None)])
def test_parse_layer_range(text, expected):
    assert parse_layer_range(text) == expected


@pytest.mark.parametrize("text", ["-1", "5-3", "a", "1-", ",", "1..3"])
def test_parse_layer_range_refuses_nonsense_naming_the_flag(text):
    with pytest.raises(UsageError, match="--train-layers"):
        parse_layer_range(text, "--train-layers")


def test_format_layers_round_trips():
    for text in ("10-15", "0,2,4-5", "7"):
        assert format_layers(parse_layer_range(text)) == text
    assert format_layers(None) == "all"


@pytest.mark.parametrize(("names", "model_type", "prefix"), [
    (LLAMA, "llama", "model.layers"), (LLAMA, "gemma2", "model.layers"),
    (LLAMA, "qwen2", "model.layers"), (GPT2, "gpt2", "transformer.h"),
    (LLAMA, None, "model.layers"), (GPT2, "something-else", "transformer.h"),
    (["base_model.model.model.layers.0.q.weight"], None, "base_model.model.model.layers")])
def test_every_preset_architecture_and_unknown_ones_by_name(names, model_type, prefix):
    assert layer_prefix(names, model_type) == prefix


def test_resolve_selects_exactly_the_named_layers():
    layers, pattern = resolve_layers("10-15", LLAMA, "llama")
    assert layers == tuple(range(10, 16))
    chosen = [n for n in LLAMA if re.search(pattern, n)]
    assert chosen == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(10, 16)]
    # "1" must not select layers 10-15.
    _, one = resolve_layers("1", LLAMA, "llama")
    assert [n for n in LLAMA if re.search(one, n)] == ["model.layers.1.mlp.down_proj.weight"]
    _, gpt = resolve_layers("1-2", GPT2, "gpt2")
    assert [n for n in GPT2 if re.search(gpt, n)] == [
        "transformer.h.1.attn.c_attn.weight", "transformer.h.2.attn.c_attn.weight"]
    assert resolve_layers("all", LLAMA, "llama") is None


def test_a_layer_the_model_lacks_is_refused():
    assert count_layers(GPT2, "transformer.h") == 4
    with pytest.raises(UsageError, match=r"--layers 3-4: the model has 4 decoder layers \(0..3\)"):
        resolve_layers("3-4", GPT2, "gpt2")
    with pytest.raises(UsageError, match="cannot find the decoder layers"):
        resolve_layers("0", ["encoder.block.0.weight"], "t5")
