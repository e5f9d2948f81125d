"""`--gradient-checkpointing`, `--optimizer` and `--bf16-weights` on every command that trains:
accepted, recorded in undo.json / results.json, and the 8-bit optimizers refused in one line
(exit 2, nothing written) where bitsandbytes or CUDA is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

COMMON = ("--max-steps", "2", "--batch-size", "2", "--max-length", "32", "-q")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "text": write_jsonl(d / "text.jsonl", [{"text": f"{a} + {a} = {2 * a}"}
                                              for a in range(30)]),
        "eval": write_jsonl(d / "eval.jsonl", [{"prompt": f"{a} + 1 = ", "answer": str(a + 1)}
                                              for a in range(4)]),
    }


def _train_settings(out: Path) -> dict:
    return json.loads((out / "undo.json").read_text())["arguments"]["train"]


def test_training_commands_record_the_memory_options(cli, tiny_llama, data, tmp_path):
    ran = cli("train", tmp_path / "t", "--init", tiny_llama, "--data", data["text"],
              "--optimizer", "adafactor", "--gradient-checkpointing", *COMMON)
    assert ran.exit_code == 0, ran.output
    assert {k: _train_settings(tmp_path / "t")[k] for k in
            ("optimizer", "gradient_checkpointing", "bf16_weights")} == {
        "optimizer": "adafactor", "gradient_checkpointing": True, "bf16_weights": False}

    ran = cli("unlearn", tiny_llama, tmp_path / "u", "--method", "maxent", "--forget",
              data["text"], "--gradient-checkpointing", "--bf16-weights", *COMMON)
    assert ran.exit_code == 0, ran.output
    settings = _train_settings(tmp_path / "u")
    assert settings["gradient_checkpointing"] and settings["bf16_weights"]
    assert settings["optimizer"] == "adamw"

    ran = cli("distill", tmp_path / "d", "--teacher", tiny_llama, "--student", "teacher",
              "--alpha", "0.5", "--beta", "0.1", "--data", data["text"], "--train-layers", "1",
              "--hidden-loss-weight", "0.5", "--gradient-checkpointing",
              "--optimizer", "adafactor", *COMMON)
    assert ran.exit_code == 0, ran.output
    settings = _train_settings(tmp_path / "d")
    assert settings["gradient_checkpointing"] and settings["optimizer"] == "adafactor"


def test_relearn_attack_records_the_optimizer(cli, tiny_llama, data, tmp_path):
    out = tmp_path / "attack"
    ran = cli("relearn-attack", tiny_llama, "--data", data["text"], "--eval",
              f"forget={data['eval']}", "--optimizers", "adafactor", "--lrs", "1e-3",
              "--steps", "2", "--eval-every", "1", "--lora", "--lora-rank", "4",
              "--gradient-checkpointing", "--max-length", "32", "--out", out, "--no-plot", "-q")
    assert ran.exit_code == 0, ran.output
    results = json.loads((out / "results.json").read_text())
    assert results["attack"]["optimizers"] == ["adafactor"]
    assert results["attack"]["gradient_checkpointing"] is True
    assert [r["optimizer"] for r in results["runs"]] == ["adafactor"]


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_eight_bit_optimizers_are_refused_before_any_work(cli, tiny_llama, data, tmp_path,
                                                         name):
    ran = cli("train", tmp_path / "t", "--init", tiny_llama, "--data", data["text"],
              "--optimizer", name, *COMMON)
    assert ran.exit_code == 2
    assert ran.stderr.count("\n") == 1 and f"--optimizer {name} needs" in ran.stderr
    assert not (tmp_path / "t").exists()
    ran = cli("relearn-attack", tiny_llama, "--data", data["text"], "--eval",
              f"forget={data['eval']}", "--optimizers", f"adamw,{name}", "--lrs", "1e-3",
              "--steps", "1", "--out", tmp_path / "a", "-q")
    assert ran.exit_code == 2 and f"--optimizer {name} needs" in ran.stderr
    assert not (tmp_path / "a").exists()
