"""`undo init`: random checkpoints with local tokenizers that load with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from undo_cli.modelfactory import (
    PRESETS,
    build_char_tokenizer,
    build_config,
    count_parameters,
    random_model,
)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "qwen2"])
def test_init_writes_a_loadable_checkpoint(arch, cli, tmp_path):
    out = tmp_path / arch
    result = cli("init", out, "--arch", arch, "--layers", 1, "--hidden", 32, "--heads", 2,
                 "--intermediate", 64, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert summary["parameters"] == count_parameters(model)
    assert model.config.vocab_size == len(tok)
    text = "abc 12 + 7 = 19\nxyz"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    ids = torch.tensor([tok(text)["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["stage"] == "init" and manifest["arguments"]["arch"] == arch


def test_presets_have_the_advertised_sizes():
    tok = build_char_tokenizer()
    sizes = {name: count_parameters(random_model(build_config("llama", shape, tok)))
             for name, shape in PRESETS.items()}
    assert 0.4e6 < sizes["tiny"] < 0.7e6
    assert 8e6 < sizes["small"] < 12e6


def test_init_is_deterministic_per_seed(cli, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli("init", tmp_path / name, "--seed", seed, "--hidden", 32).exit_code == 0
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b and a != c


def test_char_alphabet_tokenizer(cli, tmp_path):
    assert cli("init", tmp_path / "m", "--tokenizer", "char:0123456789+= \\n",
               "--hidden", 32).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tok) == 4 + 14
    assert tok.decode(tok("1+2=3\n")["input_ids"], skip_special_tokens=True) == "1+2=3\n"


@pytest.mark.parametrize("args, message", [
    (["--arch", "mamba"], "unknown architecture"),
    (["--preset", "huge"], "unknown preset"),
    (["--hidden", "30", "--heads", "4"], "not divisible"),
    (["--layers", "0"], "--layers must be at least 1"),
    (["--tokenizer", "nope/missing"], "--tokenizer"),
    (["--tokenizer", "char:"], "alphabet is empty"),
])
def test_init_bad_arguments(args, message, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("init", out, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
