"""`undo init`: random checkpoints with local tokenizers that load with plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl
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


KOREAN = "대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다."
ENGLISH = "ABASEMENT, n.  A decent and customary mental attitude in the presence of wealth."


def _corpus(tmp_path):
    rows = [{"text": f"{ENGLISH} {i}"} for i in range(20)] + [{"text": KOREAN}] * 20
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def test_bpe_tokenizer_round_trips_both_languages_and_is_byte_identical(cli, tmp_path):
    data = _corpus(tmp_path)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q: 국민", "completion": " 주권"}])
    for name in ("a", "b"):
        result = cli("init", tmp_path / name, "--tokenizer", "bpe:300", "--tokenizer-data",
                     data, "--tokenizer-data", qa, "--hidden", 32, "--arch", "gemma2")
        assert result.exit_code == 0, result.stderr
    a, b = ((tmp_path / n / "tokenizer.json").read_bytes() for n in "ab")
    assert a == b
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == 300
    for text in (KOREAN, ENGLISH, "unseen: ünïcödé 😀 日本語", KOREAN + "\n" + ENGLISH):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Merges were learnt in both scripts: a Korean word is fewer tokens than its bytes.
    assert len(tok(KOREAN, add_special_tokens=False)["input_ids"]) < 0.75 * len(KOREAN.encode())
    manifest = json.loads((tmp_path / "a" / "undo.json").read_text())
    files = manifest["arguments"]["tokenizer_data"]
    assert [f["path"] for f in files] == [str(data), str(qa)]
    assert all(f["fingerprint"].startswith("blake3:") for f in files)
    # Other training data give another tokenizer.
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": ENGLISH}] * 40)
    assert cli("init", tmp_path / "c", "--tokenizer", "bpe:300", "--tokenizer-data", other,
               "--hidden", 32).exit_code == 0
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() != a


def test_bpe_tokenizer_is_identical_across_processes(tmp_path):
    data = _corpus(tmp_path)
    script = ("import sys; from undo_cli.modelfactory import load_tokenizer_spec; "
              "load_tokenizer_spec('bpe:300', [sys.argv[1]]).save_pretrained(sys.argv[2])")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(data), str(tmp_path / name)],
                       check=True)
    assert ((tmp_path / "a" / "tokenizer.json").read_bytes()
            == (tmp_path / "b" / "tokenizer.json").read_bytes())


def test_char_tokenizer_takes_any_unicode_alphabet(cli, tmp_path):
    # As written (the old unicode_escape decoding turned "ä" into two tokens "Â¤" ...).
    assert cli("init", tmp_path / "m", "--tokenizer", "char:abcäö 한국어\\n",
               "--hidden", 32).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    for text in ("abcäö", "한국어 abc\n", "ö한"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Outside the alphabet: <unk> ("€" shares no leading byte with a character of it).
    assert set(tok("x€", add_special_tokens=False)["input_ids"]) == {tok.unk_token_id}
    # Escapes still work, and give the same characters as writing them.
    escapes = "char:abc\\u00e4\\u00f6 \\ud55c\\uad6d\\uc5b4\\n"
    assert cli("init", tmp_path / "e", "--tokenizer", escapes, "--hidden", 32).exit_code == 0
    escaped = AutoTokenizer.from_pretrained(tmp_path / "e")
    assert escaped.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "bpe:300"], "needs --tokenizer-data"),
    (["--tokenizer", "bpe:10", "--tokenizer-data", "DATA"], "must hold 260"),
    (["--tokenizer", "bpe:lots", "--tokenizer-data", "DATA"], "expected bpe:N"),
    (["--tokenizer", "char", "--tokenizer-data", "DATA"], "only used by --tokenizer bpe"),
    (["--tokenizer", "bpe:300", "--tokenizer-data", "missing.jsonl"], "not found"),
    (["--tokenizer", "char:ab\\u12"], "broken backslash escape"),
])
def test_tokenizer_bad_arguments(args, message, cli, tmp_path):
    data = _corpus(tmp_path)
    out = tmp_path / "out"
    result = cli("init", out, "--hidden", 32,
                 *[str(data) if a == "DATA" else a for a in args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
