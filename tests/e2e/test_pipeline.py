"""The UNDO pipelines (examples/arithmetic.sh, alpha_sweep.sh, wmdp_shaped.sh) in their smoke
configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_arithmetic_pipeline_smoke(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "arithmetic.sh")], cwd=tmp_path,
                          env={**env, "THREADS": "2"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # A numbered progress line per stage; with 2 threads base and oracle train side by side
    # (one thread each), and only the base model's progress shows.
    stages = [line for line in done.stderr.splitlines() if line.startswith("== [")]
    assert [line.split("]")[0] for line in stages] == [
        "== [1/7", "== [2/7", *(f"== [{i}/7" for i in range(4, 8))]
    assert "base (retain + forget) and oracle (retain only), side by side" in stages[1]
    assert "demo wall time" in done.stderr.splitlines()[-1]
    assert done.stderr.count("step 10: loss") == 1  # the base model's progress, not the oracle's
    base, oracle = (json.loads((out / m / "undo.json").read_text()) for m in ("base", "oracle"))
    assert base["compute"]["steps"] == oracle["compute"]["steps"] == 10

    # Every stage wrote what the next one reads, with its manifest.
    stages = {"base": "train", "oracle": "train", "unlearned": "unlearn",
              "perturbed": "perturb", "undo": "distill"}
    for name, stage in stages.items():
        ckpt = out / name
        assert json.loads((ckpt / "undo.json").read_text())["stage"] == stage
        AutoModelForCausalLM.from_pretrained(ckpt)
        AutoTokenizer.from_pretrained(ckpt)
    chain = json.loads((out / "undo" / "undo.json").read_text())
    roles = {p["role"]: p for p in chain["parents"]}
    assert roles["teacher"]["manifest"]["stage"] == "unlearn"
    assert roles["student"]["manifest"]["stage"] == "perturb"
    assert roles["teacher"]["manifest"]["parents"][0]["manifest"]["stage"] == "train"

    for name in ("base", "unlearned", "undo", "oracle"):
        results = json.loads((out / "attacks" / name / "results.json").read_text())
        assert results["forget_metric"] == "forget.accuracy"
        assert results["worst_case"] and results["runs"]

    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["base", "unlearned", "undo", "oracle"]
    text = (out / "report" / "report.md").read_text()
    for name in ("base", "unlearned", "undo", "oracle"):
        assert f"| {name} |" in text
    for figure in ("relearn_curves.png", "pareto.png", "retain_vs_forget.png"):
        assert (out / "report" / figure).stat().st_size > 1000
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["oracle"]["relative_compute"] == 1.0
    assert rows["base"]["compute_flops"] == 0.0
    assert rows["undo"]["compute_flops"] > 0

    # The alpha sweep reuses the run: one student per alpha, the teacher cached once.
    done = subprocess.run(["bash", str(ROOT / "examples" / "alpha_sweep.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = json.loads((out / "sweep" / "report" / "report.json").read_text())
    assert [r["model"] for r in sweep["rows"]] == ["base", "unlearned", "oracle", "undo-0.2",
                                                   "undo-0.8"]
    first, second = (json.loads((out / "sweep" / f"undo-{a}" / "undo.json").read_text())
                     for a in ("0.2", "0.8"))
    assert first["compute"]["flops_teacher"] > 0
    assert second["compute"]["flops_teacher"] == 0  # read from the teacher cache
    assert second["compute"]["teacher_cache"]["hits"] == second["compute"]["steps"]

    # SEEDS=2 from perturb on: a second UNDO model and attack set, pooled in one report.
    done = subprocess.run(["bash", str(ROOT / "examples" / "arithmetic.sh")], cwd=tmp_path,
                          env={**env, "STAGES": "undo", "SEEDS": "2"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "undo-s1" / "undo.json").read_text())["seed"] == 1
    pooled = json.loads((out / "report" / "report.json").read_text())
    rows = {r["model"]: r for r in pooled["rows"]}
    assert list(rows) == ["base", "unlearned", "undo", "oracle"]
    assert all(r["seeds"] == 2 for r in rows.values())
    assert rows["undo"]["results_dirs"] == [str(out / "attacks" / "undo"),
                                            str(out / "attacks" / "undo-s1")]
    finals = [json.loads((out / "attacks" / d / "results.json").read_text())["summary"]["final"]
              for d in ("undo", "undo-s1")]
    assert rows["undo"]["forget_after"] == pytest.approx(sum(finals) / 2)
    assert rows["undo"]["forget_after_lower"] <= rows["undo"]["forget_after"] \
        <= rows["undo"]["forget_after_upper"]


@pytest.mark.slow
def test_arithmetic_prepare_trains_base_and_oracle_in_turn_with_one_thread(tmp_path):
    """With one thread, base and oracle train in turn, each with its own stage line (the
    default suite's smoke runs them side by side)."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "one"), "OMP_NUM_THREADS": "1",
           "STAGES": "prepare",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "arithmetic.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [line for line in done.stderr.splitlines() if line.startswith("== [")]
    assert [line.split("  (")[0] for line in stages] == [
        "== [1/4] data", "== [2/4] train base (retain + forget)",
        "== [3/4] train oracle (retain only, the data-filtering gold standard)",
        "== [4/4] unlearn (MaxEnt)"]


def test_wmdp_shaped_pipeline_smoke(tmp_path):
    """The paper's WMDP recipe on the synthetic multiple-choice task, every new option on."""
    out = tmp_path / "run"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "wmdp_shaped.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # The data: four-choice questions in the WMDP/MMLU layout and a corpus per domain.
    first = json.loads((out / "data" / "forget_mc.jsonl").read_text().splitlines()[0])
    assert len(first["choices"]) == 4 and isinstance(first["answer"], int)
    # UNDO the WMDP way: pure shrink of the trained layer only, distilled with the hidden-state
    # term and the base model as a second teacher.
    manifest = json.loads((out / "undo" / "undo.json").read_text())
    args = manifest["arguments"]
    assert args["noise"]["alpha"] == 0.25 and args["noise"]["beta"] == 0
    assert args["choice_format"] == "qa"
    record = manifest["distill"]
    assert record["trained"]["layers"] == [1]
    assert record["noise"]["only_trained"]
    assert set(record["noise"]["shrunk"]) == set(record["trained"]["names"])
    assert record["hidden_loss"]["weight"] == 1.0
    assert manifest["compute"]["second_teacher"]["of_batches"] > 0
    assert {p["role"] for p in manifest["parents"]} == {"teacher", "second_teacher"}
    assert manifest["compute"]["trainable_parameters"] < manifest["compute"]["parameters"]
    # Multiple-choice accuracy of both domains for every model, before the attack.
    evals = json.loads((out / "eval.json").read_text())["results"]
    assert [Path(r["checkpoint"]).name for r in evals] == ["base", "unlearned", "undo",
                                                           "oracle"]
    for r in evals:
        assert set(r["metrics"]) == {"retain", "forget"}
        assert 0 <= r["metrics"]["forget"]["accuracy"] <= 1
    # The attack with the paper's three WMDP learning rates, and the report.
    for name in ("unlearned", "undo"):
        results = json.loads((out / "attacks" / name / "results.json").read_text())
        assert results["attack"]["lrs"] == [4.62e-6, 1e-5, 2.15e-5]
        assert results["forget_metric"] == "forget.accuracy"
    report = json.loads((out / "attacks" / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["unlearned", "undo"]


@pytest.mark.slow
def test_the_demo_shows_the_papers_ordering(tmp_path):
    """The default demo (several minutes): unlearning alone is undone by the attack, the
    oracle relearns less, and UNDO sits between them (positive robustness)."""
    out = tmp_path / "run"
    env = {**os.environ, "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "arithmetic.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads(
        (out / "report" / "report.json").read_text())["rows"]}
    assert rows["unlearned"]["forget_before"] < 0.1 < rows["unlearned"]["forget_after"]
    assert rows["oracle"]["forget_after"] < rows["unlearned"]["forget_after"]
    assert rows["undo"]["relative_robustness_auc"] > 0


def test_language_pipeline_smoke(tmp_path):
    """The paper's language setting (examples/language.sh) on the built-in corpus: a BPE over
    English and Korean, base and oracle, MaxEnt, UNDO at one alpha, attacks on the forget loss
    and the report (the frontier of several alphas: tests/unit/test_report.py)."""
    out = tmp_path / "run"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "SMOKE_ALPHAS": "0.6", "THREADS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "language.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [line.split("  (")[0] for line in done.stderr.splitlines()
              if line.startswith("== [")]
    assert stages[-1] == "== [8/8] report" and len(stages) == 7  # base + oracle share a line
    tok = AutoTokenizer.from_pretrained(out / "undo-0.6")
    korean = json.loads((out / "data" / "forget_eval.jsonl").read_text("utf-8").split("\n")[0])
    ids = tok(korean["text"])["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == korean["text"]
    init = json.loads((out / "init" / "undo.json").read_text())
    assert init["arguments"]["tokenizer"] == "bpe:300"
    assert len(init["arguments"]["tokenizer_data"]) == 2
    base, oracle = (json.loads((out / m / "undo.json").read_text()) for m in ("base", "oracle"))
    assert base["arguments"]["data"] == [str(out / "data" / "retain_train.jsonl"),
                                         str(out / "data" / "forget_train.jsonl") + ":0.2"]
    assert oracle["arguments"]["data"] == [str(out / "data" / "retain_train.jsonl")]
    student = json.loads((out / "undo-0.6" / "undo.json").read_text())
    assert student["arguments"]["noise"]["alpha"] == 0.6
    for name in ("base", "unlearned", "undo-0.6", "oracle"):
        results = json.loads((out / "attacks" / name / "results.json").read_text())
        assert results["forget_metric"] == "forget.loss" and results["worst_case"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["forget_metric"] == "forget.loss"
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"undo-0.6", "base", "unlearned", "oracle"}
    assert rows["oracle"]["relative_compute"] == 1.0
    assert rows["undo-0.6"]["relative_robustness_auc"] is not None
    assert (out / "report" / "pareto.png").stat().st_size > 1000
