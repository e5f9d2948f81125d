"""The memory plan (`undo_cli.checkpoint.plan`, `undo plan`, `--dry-run`): its counts against
the models themselves, its activations against what autograd really keeps, and the commands
that print it and stop before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from undo_cli.checkpoint.plan import count_parameters, lora_parameters, plan_memory
from undo_cli.modelfactory import (
    ARCHITECTURES,
    ModelShape,
    build_char_tokenizer,
    build_config,
    random_model,
)
from undo_cli.modelfactory import count_parameters as count_model

SHAPES = [ModelShape(2, 32, 4, 64, 64), ModelShape(3, 48, 6, 80, 96)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameters_counted_from_the_config_are_exact(tok, arch):
    for shape in SHAPES:
        model = random_model(build_config(arch, shape, tok))
        assert count_parameters(model.config.to_dict()) == count_model(model)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi3"])
def test_lora_and_train_layers_counts_match_the_models(tok, arch):
    from peft import LoraConfig, get_peft_model

    from undo_cli.stage import select_parameters

    model = random_model(build_config(arch, SHAPES[1], tok))
    config = model.config.to_dict()
    plan = plan_memory(config, batch_size=1, length=8, trained_layers=1)
    assert plan.trainable == sum(p.numel() for _, p in select_parameters(model, layers="1"))
    assert plan.optimizer_state == 2 * 4 * plan.trainable  # AdamW: two fp32 moments
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_parameters(config, 4) == trained


def _saved_activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    model.train()
    model.config.use_cache = False
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_activation_estimate_matches_what_autograd_keeps(arch):
    tok = build_char_tokenizer("0123456789+=")  # a small vocabulary: the layers dominate
    model = random_model(build_config(arch, ModelShape(4, 64, 4, 256, 128), tok))
    ids = torch.randint(4, len(tok), (2, 96))
    measured = _saved_activation_bytes(model, ids)
    plan = plan_memory(model.config.to_dict(), batch_size=2, length=96)
    assert plan.activations == pytest.approx(measured, rel=0.15)
    checkpointed = plan_memory(model.config.to_dict(), batch_size=2, length=96,
                               gradient_checkpointing=True)
    assert checkpointed.activations < 0.5 * plan.activations


def test_options_change_the_plan_as_they_should(tok):
    config = build_config("llama", SHAPES[1], tok).to_dict()
    base = plan_memory(config, batch_size=4, length=64)
    p = base.parameters
    assert (base.weights, base.gradients, base.optimizer_state) == (4 * p, 4 * p, 8 * p)
    pure = plan_memory(config, batch_size=4, length=64, bf16_weights=True)
    assert (pure.weights, pure.gradients, pure.optimizer_state) == (2 * p, 2 * p, 4 * p)
    assert pure.activations == base.activations // 2
    eight = plan_memory(config, batch_size=4, length=64, optimizer="adamw8bit")
    assert eight.optimizer_state == 2 * p
    factored = plan_memory(config, batch_size=4, length=64, optimizer="adafactor")
    assert factored.optimizer_state < base.optimizer_state / 4
    sharded = plan_memory(config, batch_size=4, length=64, processes=4, sharded=True)
    assert sharded.weights == base.weights // 4 and sharded.activations == base.activations
    assert plan_memory(config, batch_size=8, length=64).activations == 2 * base.activations
    small = plan_memory(config, batch_size=4, length=64, available=base.total - 1)
    assert small.fits is False and "does NOT fit" in small.lines()[-1]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "t.jsonl",
                       [{"text": f"{a} + {a} = {2 * a}"} for a in range(20)])


def test_plan_and_dry_run_print_the_plan_and_write_nothing(cli, tiny_llama, text, tmp_path):
    out = tmp_path / "out"
    ran = cli("plan", "train", out, "--init", tiny_llama, "--data", text, "--batch-size", "4",
              "--max-length", "32", "--gradient-checkpointing", "--json")
    assert ran.exit_code == 0, ran.output
    plan = json.loads(ran.stdout)["plan"]
    config = json.loads((tiny_llama / "config.json").read_text())
    expected = plan_memory(config, batch_size=4, length=32, gradient_checkpointing=True)
    assert plan["parameters"] == count_parameters(config)
    assert plan["activations"] == expected.activations and plan["fits"] is True
    assert not out.exists() and not list(tmp_path.iterdir())

    for args in (("unlearn", tiny_llama, out, "--method", "rmu", "--forget", text),
                 ("distill", out, "--teacher", tiny_llama, "--student", "teacher", "--alpha",
                  "0.5", "--beta", "0.1", "--data", text, "--train-layers", "1"),
                 ("relearn-attack", tiny_llama, "--data", text, "--eval", f"f={text}",
                  "--forget-metric", "f.loss", "--lora", "--lora-rank", "4", "--out", out)):
        ran = cli(*args, "--dry-run")
        assert ran.exit_code == 0, ran.output
        assert "activations" in ran.stderr and "fits in the" in ran.stderr
        assert not out.exists()
    # The plan is the whole decision: a dry run refuses what the run would refuse.
    ran = cli("relearn-attack", tiny_llama, "--data", text, "--eval", f"f={text}", "--lora",
              "--out", out, "--dry-run")
    assert ran.exit_code == 2 and "give --forget-metric SET.METRIC" in ran.stderr
    assert not out.exists()


def test_the_plan_and_the_load_refusal_use_the_same_numbers(cli, tiny_llama, text, tmp_path,
                                                            monkeypatch):
    config = json.loads((tiny_llama / "config.json").read_text())
    limit = 4 * count_parameters(config) - 1  # the weights alone do not fit
    monkeypatch.setenv("UNDO_MEMORY_LIMIT", str(limit))
    ran = cli("plan", "train", tmp_path / "o", "--init", tiny_llama, "--data", text, "--json")
    plan = json.loads(ran.stdout)["plan"]
    assert plan["fits"] is False and plan["weights"] > limit
    ran = cli("train", tmp_path / "o", "--init", tiny_llama, "--data", text, "--max-steps", "1")
    assert ran.exit_code == 2
    assert f"({count_parameters(config):,} parameters estimated from its config" in ran.stderr
    assert "the memory plan needs" in ran.stderr  # warned before the refusal
