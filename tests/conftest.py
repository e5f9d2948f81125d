"""Shared fixtures: tiny models and tokenizers built locally (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from undo_cli.runtime import quiet_libraries  # noqa: E402

quiet_libraries()
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A small alphabet keeps vocabularies (and so test models) tiny.
TEST_ALPHABET = "0123456789+-*/= abcdefghijklmnopqrstuvwxyz.?\n"


def make_checkpoint(path: Path, arch: str = "llama", *, layers: int = 2, hidden: int = 32,
                    heads: int = 4, intermediate: int = 64, seed: int = 0,
                    alphabet: str = TEST_ALPHABET, max_position: int = 128) -> Path:
    """Write a tiny random checkpoint with `undo init`'s library functions."""
    from undo_cli.checkpoint import atomic_output
    from undo_cli.modelfactory import ModelShape, build_char_tokenizer, build_config, random_model

    tok = build_char_tokenizer(alphabet)
    shape = ModelShape(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                       max_position=max_position)
    model = random_model(build_config(arch, shape, tok), seed=seed)
    with atomic_output(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write `rows` (dicts) as JSON Lines to `path`; returns `path`."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tok():
    """The character tokenizer of the test models (TEST_ALPHABET)."""
    from undo_cli.modelfactory import build_char_tokenizer

    return build_char_tokenizer(TEST_ALPHABET)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama with a character tokenizer (read-only: do not modify)."""
    return make_checkpoint(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (lm_head tied to the token embedding)."""
    return make_checkpoint(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2")


@pytest.fixture()
def cli():
    """Run `undo ...` in-process: `cli("perturb", str(a), str(b), "--alpha", "0.5")`.

    Returns click's Result (exit_code, stdout, stderr, output).
    """
    from undo_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
