"""The real-scale recipes (examples/deep_ignorance.sh, zephyr_wmdp.sh,
attack_open_unlearning.sh) in their offline SMOKE=1 mode on tiny stand-ins, the estimates
script, and the FSDP + CPU offload launcher config. The scripts' `undo` commands run through
the warm `undo_server` fixture (tests/forkserver.py), as the pipeline smokes do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _smoke(script: str, out: Path, server) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "UNDO": server.command}
    done = subprocess.run(["bash", str(ROOT / "examples" / script)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_deep_ignorance_smoke(tmp_path, undo_server):
    out = tmp_path / "di"
    _smoke("deep_ignorance.sh", out, undo_server)
    assert json.loads((out / "unfiltered" / "config.json").read_text())["model_type"] == \
        "gpt_neox"
    manifest = json.loads((out / "undo" / "undo.json").read_text())
    assert manifest["arguments"]["train"]["gradient_checkpointing"] is True
    assert manifest["arguments"]["train"]["optimizer"] == "adafactor"
    evals = json.loads((out / "eval.json").read_text())["results"]
    assert [Path(r["checkpoint"]).name for r in evals] == ["unfiltered", "filtered",
                                                           "unlearned", "undo"]
    for model in ("oracle", "unlearned", "undo"):
        assert _results(out / "attacks" / model)["attack"]["optimizers"] == ["adafactor"]
    report = json.loads((out / "attacks" / "report" / "report.json").read_text())
    assert {r["model"] for r in report["rows"]} == {"oracle", "unlearned", "undo"}


def test_zephyr_wmdp_smoke(tmp_path, undo_server):
    out = tmp_path / "zw"
    done = _smoke("zephyr_wmdp.sh", out, undo_server)
    assert "activations" in done.stderr and "fits in the" in done.stderr  # undo plan
    manifest = json.loads((out / "unlearned" / "undo.json").read_text())
    assert manifest["arguments"]["method"] == "rmu"
    assert json.loads((out / "zephyr" / "config.json").read_text())["model_type"] == "mistral"
    for model in ("unlearned", "undo"):
        assert _results(out / "attacks" / model)["forget_metric"] == "forget.accuracy"
    assert (out / "attacks" / "report" / "report.md").exists()


def test_attack_open_unlearning_smoke(tmp_path, undo_server):
    out = tmp_path / "ou"
    _smoke("attack_open_unlearning.sh", out, undo_server)
    full = _results(out / "attacks" / "unlearned-full")
    kinds = {r.get("attack") for r in full["runs"]}
    assert {"ablate-direction", "few-shot"} <= kinds
    assert full["attack"]["quantize"]["bits"] == 4
    assert _results(out / "attacks" / "unlearned-lora")["attack"]["mode"] == "lora"
    report = json.loads((out / "attacks" / "report" / "report.json").read_text())
    assert {r["model"] for r in report["rows"]} == {"oracle", "unlearned"}


def test_recipe_estimates_come_from_the_plan():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "recipe_estimates.py")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "| AdamW, fp32 master, --bf16 | 7.24B |" in done.stdout  # Zephyr-7B: 7.24B
    assert "| AdamW, fp32 master, --bf16 | 8.03B |" in done.stdout  # Llama-3-8B


def test_fsdp_offload_config_is_read_by_accelerate():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / "fsdp_offload.yaml"))
    assert config.distributed_type == "FSDP"
    assert config.fsdp_config["fsdp_offload_params"] is True
    assert config.fsdp_config["fsdp_activation_checkpointing"] is True
    assert config.mixed_precision == "no"
