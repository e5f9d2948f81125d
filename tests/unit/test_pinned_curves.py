"""One pinned short loss curve per command that trains: silent numeric drift fails here.

Every other test checks a property (a loss equals a direct computation, a resume equals an
uninterrupted run, ...); none notices that all numbers moved together, e.g. after a change
of the data order, the packing, a default or a library's numerics. These runs are tiny and
fixed: a change that moves them must be deliberate, and then the pins are updated with

    UNDO_REPIN=1 python -m pytest tests/unit/test_pinned_curves.py -s

which prints the new values (and says in the CHANGELOG why they moved). The tolerance leaves
room for another CPU's float summation order (2 threads, fp32), not for a different run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_checkpoint

REL = 2e-3  # relative tolerance: BLAS differences across CPUs, not behaviour changes
TEXT = [f"{a} + {b} = {a + b}" for a in range(12) for b in range(5)]
FORGET = [f"{a} * {b} = {a * b}" for a in range(12) for b in range(5)]
EVAL = [{"prompt": f"{a} * {b} = ", "answer": str(a * b)} for a in range(4) for b in range(3)]
COMMON = ["--max-length", "32", "--batch-size", "4", "--seed", "0", "--quiet", "--device",
          "cpu"]

PINNED = {
    "train": [3.932118, 3.715953, 3.593529, 3.537661, 3.492896],
    "unlearn": [3.930713, 3.852873, 3.77535, 3.727665, 3.667125],
    "distill": [0.004407, 0.00362, 0.003158, 0.002845, 0.002645],
    "relearn-attack": [3.902245, 3.607, 3.352264],  # issue 20: the answer's space scored
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pinned")

    def write(name: str, rows: list[dict]) -> Path:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    return {"root": root, "ckpt": make_checkpoint(root / "base"),
            "text": write("text.jsonl", [{"text": t} for t in TEXT]),
            "forget": write("forget.jsonl", [{"text": t} for t in FORGET]),
            "eval": write("eval.jsonl", EVAL)}


def _losses(out: Path, key: str = "loss") -> list[float]:
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [round(e[key], 6) for e in log if e["type"] == "train"]


def _check(name: str, got: list[float]) -> None:
    if os.environ.get("UNDO_REPIN"):
        print(f'\n    "{name}": {got},')
        return
    assert got == pytest.approx(PINNED[name], rel=REL), (name, got)


def test_train_curve(cli, files):
    out = files["root"] / "train"
    r = cli("train", out, "--init", files["ckpt"], "--data", files["text"], "--max-steps", 5,
            "--lr", "3e-3", "--log-every", 1, *COMMON)
    assert r.exit_code == 0, r.output
    _check("train", _losses(out))


def test_unlearn_curve(cli, files):
    out = files["root"] / "unlearned"
    r = cli("unlearn", files["ckpt"], out, "--method", "maxent", "--forget", files["forget"],
            "--retain", files["text"], "--max-steps", 5, "--lr", "1e-3", "--log-every", 1,
            *COMMON)
    assert r.exit_code == 0, r.output
    _check("unlearn", _losses(out))


def test_distill_curve(cli, files):
    out = files["root"] / "distilled"
    r = cli("distill", out, "--teacher", files["ckpt"], "--student", "teacher", "--alpha",
            "0.5", "--beta", "0.1", "--data", files["text"], "--max-steps", 5, "--lr", "1e-3",
            "--log-every", 1, *COMMON)
    assert r.exit_code == 0, r.output
    _check("distill", _losses(out, "kd_loss"))


def test_relearn_attack_curve(cli, files):
    out = files["root"] / "attack"
    r = cli("relearn-attack", files["ckpt"], "--data", files["forget"], "--eval",
            f"forget={files['eval']}", "--forget-metric", "forget.loss", "--lrs", "3e-3",
            "--steps", 4, "--eval-every", 2, "--out", out, "--no-plot", *COMMON)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    _check("relearn-attack", [round(e["value"], 6) for e in results["worst_case"]])
