"""`undo report`: relative robustness and compute from results and manifest chains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from undo_cli.report import build_report, relative_robustness


def _manifest(stage: str, flops: float, parents: list[tuple[str, str, dict | None]]) -> dict:
    return {"stage": stage, "compute": {"flops": flops},
            "parents": [{"role": r, "fingerprint": f, "manifest": m} for r, f, m in parents]}


def _results_dir(root: Path, name: str, fingerprint: str, checkpoint_manifest: dict,
                 before: float, after: float, retain: float) -> Path:
    d = root / name
    d.mkdir()
    curve = [{"step": 0, "value": before, "lr": 1e-4}, {"step": 10, "value": after, "lr": 1e-4}]
    (d / "results.json").write_text(json.dumps({
        "checkpoint": f"/models/{name}", "fingerprint": fingerprint,
        "forget_metric": "forget.accuracy", "direction": "max",
        "initial": {"forget.accuracy": before, "retain.accuracy": retain},
        "worst_case": curve, "summary": {"final": after, "auc": (before + after) / 2},
        "runs": [], "attack": {}}))
    (d / "undo.json").write_text(json.dumps(_manifest("relearn-attack", 0.0, [
        ("input", fingerprint, checkpoint_manifest)])))
    return d


def test_report_numbers_follow_the_definitions(tmp_path):
    init = _manifest("init", 0.0, [])
    base = _manifest("train", 100.0, [("init", "sha256:init", init)])
    oracle = _manifest("train", 80.0, [("init", "sha256:init", init)])
    unlearned = _manifest("unlearn", 2.0, [("input", "sha256:base", base)])
    perturbed = _manifest("perturb", 0.0, [("input", "sha256:unl", unlearned)])
    undo = _manifest("distill", 40.0, [("teacher", "sha256:unl", unlearned),
                                       ("student", "sha256:pert", perturbed)])
    dirs = [
        _results_dir(tmp_path, "base", "sha256:base", base, 0.9, 0.95, 0.9),
        _results_dir(tmp_path, "unlearned", "sha256:unl", unlearned, 0.05, 0.8, 0.88),
        _results_dir(tmp_path, "undo", "sha256:undo", undo, 0.04, 0.5, 0.86),
        _results_dir(tmp_path, "oracle", "sha256:oracle", oracle, 0.02, 0.3, 0.9),
    ]
    report = build_report([str(d) for d in dirs], roles={"base": "base",
                                                         "unlearned": "unlearned",
                                                         "oracle": "oracle"})
    rows = {r["model"]: r for r in report["rows"]}
    assert report["retain_metric"] == "retain.accuracy"
    assert rows["undo"]["relative_robustness"] == pytest.approx((0.5 - 0.8) / (0.3 - 0.8))
    assert rows["oracle"]["relative_robustness"] == pytest.approx(1.0)
    assert rows["unlearned"]["relative_robustness"] == pytest.approx(0.0)
    # the same ratio with the AUCs (here the mean of the two curve points)
    auc = {"undo": (0.04 + 0.5) / 2, "unlearned": (0.05 + 0.8) / 2, "oracle": (0.02 + 0.3) / 2}
    assert rows["undo"]["relative_robustness_auc"] == pytest.approx(
        (auc["undo"] - auc["unlearned"]) / (auc["oracle"] - auc["unlearned"]))
    assert rows["oracle"]["relative_robustness_auc"] == pytest.approx(1.0)
    assert rows["undo"]["auc"] == pytest.approx(auc["undo"])
    # compute made from the base: unlearn + distill (the unlearned teacher counted once)
    assert rows["undo"]["compute_flops"] == pytest.approx(42.0)
    assert rows["undo"]["relative_compute"] == pytest.approx(42.0 / 80.0)
    assert rows["oracle"]["relative_compute"] == pytest.approx(1.0)
    assert rows["base"]["compute_flops"] == 0.0
    assert rows["undo"]["forget_before"] == 0.04 and rows["undo"]["retain"] == 0.86


def test_relative_robustness_with_equal_oracle_and_unlearned_is_undefined():
    assert relative_robustness(0.4, 0.5, 0.5) is None


def test_report_cli_writes_markdown_and_figures(cli, tmp_path):
    init = _manifest("init", 0.0, [])
    dirs = [_results_dir(tmp_path, name, f"sha256:{name}", _manifest("train", 10.0, [
        ("init", "sha256:init", init)]), b, a, 0.9)
        for name, b, a in (("unlearned", 0.1, 0.9), ("oracle", 0.0, 0.2), ("undo", 0.1, 0.4))]
    out = tmp_path / "report"
    result = cli("report", *dirs, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {r["model"] for r in data["rows"]} == {"unlearned", "oracle", "undo"}
    text = (out / "report.md").read_text()
    for label in ("unlearned", "oracle", "undo"):
        assert f"| {label} |" in text
    assert "| relative robustness | relative robustness (AUC) |" in text
    undo = next(r for r in data["rows"] if r["model"] == "undo")
    row = next(line for line in text.splitlines() if line.startswith("| undo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-2:] == [f"{100 * undo['relative_robustness']:.0f}%",
                          f"{100 * undo['relative_robustness_auc']:.0f}%"]
    assert undo["relative_robustness"] == pytest.approx((0.4 - 0.9) / (0.2 - 0.9))
    assert undo["relative_robustness_auc"] == pytest.approx((0.25 - 0.5) / (0.1 - 0.5))
    for figure in ("relearn_curves.png", "pareto.png", "retain_vs_forget.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_bad_inputs(cli, tmp_path):
    result = cli("report", tmp_path, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "results.json" in result.stderr
    assert not (tmp_path / "r").exists()
