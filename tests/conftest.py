"""Shared fixtures: tiny models and tokenizers built locally (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep (as `undo` sets it): spinning ones slow everything else that runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from undo_cli.runtime import quiet_libraries  # noqa: E402

quiet_libraries()
# One intra-op thread per pytest-xdist worker (`./dev.sh test` runs one per core: the tests'
# models are tiny, and a second thread per worker would only oversubscribe the cores).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

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


@pytest.fixture(scope="session")
def undo_server(tmp_path_factory):
    """A warm `undo` for the example scripts (tests/forkserver.py): set `UNDO` to its
    `command` and every `undo ...` of a script runs in a child forked from one process that
    imported torch and transformers once."""
    from forkserver import UndoServer

    with UndoServer(tmp_path_factory.mktemp("undo-server")) as server:
        yield server


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


# ------------------------------------------------------------------ checkpoints as users have them
#
# Built the way transformers and peft build real ones, locally: a GPT-2 byte-level BPE tokenizer
# (merges learnt with `tokenizers`, "Ġ" marking a leading space), a GPT-2 with tied embeddings,
# a Llama saved in bf16, a tied Qwen2 in several shards, and a LoRA adapter whose
# adapter_config.json names a hub model as its base (as every real adapter does).

BPE_CORPUS = [
    "Question: What do squirrels eat? Answer: nuts",
    "Question: What is the capital of France? Answer: Paris",
    "The squirrel buried nuts in the garden before the winter came.",
    *[f"{a} + {b} = {a + b}" for a in range(0, 40, 3) for b in range(0, 40, 7)],
    *[f"{a} * {b} = {a * b}" for a in range(0, 20, 3) for b in range(0, 20, 4)],
]
HUB_BASE = "meta-llama/Llama-3.2-1B"  # what a real adapter names; never on this machine


def build_bpe_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained on `BPE_CORPUS` with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(BPE_CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def save_model_dir(path: Path, model, tok, **save_kwargs) -> Path:
    """`model.save_pretrained` + `tok.save_pretrained` into `path`, as users' tools write."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    tok.save_pretrained(path)
    return path


def make_gpt2_bpe(path: Path, *, max_position: int = 64, seed: int = 0) -> Path:
    """A tiny GPT-2 (tied embeddings) with the BPE tokenizer; its maximum length is 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_bpe_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=max_position, n_embd=32, n_layer=2,
                        n_head=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        tie_word_embeddings=True)
    return save_model_dir(path, GPT2LMHeadModel(config), tok)


def make_bf16_llama(path: Path) -> Path:
    """The tiny test Llama, stored in bf16 (config.json says so, as transformers writes it)."""
    from transformers import AutoModelForCausalLM

    from undo_cli.modelfactory import build_char_tokenizer

    src = make_checkpoint(path.parent / (path.name + "-fp32"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    return save_model_dir(path, model, build_char_tokenizer(TEST_ALPHABET))


def make_sharded_qwen2(path: Path, shard: str = "20KB") -> Path:
    """A tiny Qwen2 with tied embeddings, saved in several shards of at most `shard`."""
    from transformers import AutoModelForCausalLM

    from undo_cli.modelfactory import build_char_tokenizer

    src = make_checkpoint(path.parent / (path.name + "-single"), arch="qwen2")
    model = AutoModelForCausalLM.from_pretrained(src)
    return save_model_dir(path, model, build_char_tokenizer(TEST_ALPHABET),
                          max_shard_size=shard)


def make_hub_adapter(path: Path, base: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA adapter trained-looking (B != 0) on `base`, saved by peft, whose
    adapter_config.json then names the hub model `HUB_BASE` as its base."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    (path / "README.md").write_text("---\nlibrary_name: peft\nbase_model: "
                                    f"{HUB_BASE}\n---\n# an adapter\n")
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = HUB_BASE
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def gpt2_bpe(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer and a maximum length of 64 (read-only)."""
    return make_gpt2_bpe(tmp_path_factory.mktemp("models") / "gpt2-bpe")


@pytest.fixture(scope="session")
def bf16_llama(tmp_path_factory) -> Path:
    """The tiny Llama stored in bf16 (read-only)."""
    return make_bf16_llama(tmp_path_factory.mktemp("models") / "llama-bf16")


@pytest.fixture(scope="session")
def sharded_qwen2(tmp_path_factory) -> Path:
    """A tiny tied Qwen2 in several safetensors shards (read-only)."""
    return make_sharded_qwen2(tmp_path_factory.mktemp("models") / "qwen2-sharded")


@pytest.fixture(scope="session")
def hub_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter on `tiny_llama` whose config names a hub base (`--base-model` needed)."""
    return make_hub_adapter(tmp_path_factory.mktemp("models") / "adapter", tiny_llama)
