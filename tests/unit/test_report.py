"""`undo report`: relative robustness and compute from results and manifest chains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    # --quiet (one declaration, shared with every command): the same report, nothing said.
    loud = cli("report", *dirs, "--out", tmp_path / "loud")
    quiet = cli("report", *dirs, "--out", tmp_path / "quiet", "-q")
    assert loud.exit_code == quiet.exit_code == 0, loud.stderr + quiet.stderr
    assert "wrote" in loud.stderr and quiet.stderr == "" and quiet.stdout == ""
    assert json.loads((tmp_path / "quiet" / "report.json").read_text())["rows"] == data["rows"]


def test_report_refuses_bad_inputs(cli, tmp_path):
    result = cli("report", tmp_path, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "results.json" in result.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# Seeds pooled, bootstrap intervals
# --------------------------------------------------------------------------------------------


def _seed_dir(root: Path, name: str, curve: list[float], items: list[list[float]] | None = None,
              retain: float = 0.9) -> Path:
    """A results directory whose worst case is `curve` at steps 0, 10, 20..., each point
    optionally with its per-item 0/1 values."""
    d = root / name
    d.mkdir(parents=True)
    worst = [{"step": 10 * i, "value": v, "lr": 1e-4}
             for i, v in enumerate(curve or [0.0] * len(items or []))]
    if items is not None:
        for point, values in zip(worst, items):
            point["items"] = {"num": values, "den": [1.0] * len(values)}
            point["value"] = sum(values) / len(values)
    steps = [p["step"] for p in worst]
    values = [p["value"] for p in worst]
    auc = sum((values[i] + values[i + 1]) / 2 * (steps[i + 1] - steps[i])
              for i in range(len(steps) - 1)) / (steps[-1] - steps[0])
    (d / "results.json").write_text(json.dumps({
        "fingerprint": f"sha256:{name}", "forget_metric": "forget.accuracy",
        "direction": "max", "initial": {"forget.accuracy": values[0], "retain.accuracy": retain},
        "worst_case": worst, "summary": {"final": values[-1], "auc": auc}}))
    return d


def test_pooling_seeds_gives_the_hand_averages(tmp_path):
    unlearned = _seed_dir(tmp_path, "unl", [0.1, 0.8, 0.9])
    oracle = _seed_dir(tmp_path, "ora", [0.0, 0.3, 0.4])
    seeds = [_seed_dir(tmp_path / "attacks", f"undo-s{i}", curve, retain=r)
             for i, (curve, r) in enumerate([([0.1, 0.4, 0.5], 0.8), ([0.1, 0.6, 0.7], 0.9),
                                             ([0.0, 0.5, 0.45], 0.85)])]
    specs = [f"unlearned={unlearned}", f"oracle={oracle}"]
    report = build_report(specs + [f"undo={d}" for d in seeds], samples=300)
    row = next(r for r in report["rows"] if r["model"] == "undo")
    finals, aucs = [0.5, 0.7, 0.45], [(0.25 + 0.45) / 2, (0.35 + 0.65) / 2, (0.25 + 0.475) / 2]
    assert row["seeds"] == 3 and row["results_dirs"] == [str(d) for d in seeds]
    assert row["forget_after"] == pytest.approx(sum(finals) / 3)
    assert row["auc"] == pytest.approx(sum(aucs) / 3)
    assert row["retain"] == pytest.approx((0.8 + 0.9 + 0.85) / 3)
    assert row["relative_robustness"] == pytest.approx((sum(finals) / 3 - 0.9) / (0.4 - 0.9))
    unl_auc, ora_auc = (0.45 + 0.85) / 2, (0.15 + 0.35) / 2
    assert row["relative_robustness_auc"] == pytest.approx(
        (sum(aucs) / 3 - unl_auc) / (ora_auc - unl_auc))
    pooled_curve = [p["value"] for p in report["curves"]["undo"]]
    assert pooled_curve == pytest.approx([0.2 / 3, 0.5, sum(finals) / 3])
    # A quoted glob pools the same directories.
    by_glob = build_report(specs + [f"undo={tmp_path / 'attacks' / 'undo-s*'}"], samples=300)
    assert by_glob["rows"][2] == row

    # The interval: seeds resampled as a loop over the same draws (the unlearned and the
    # oracle have one seed and no items: fixed).
    rng = np.random.default_rng([0, 17])
    for n in (1, 1):  # the draws of the two one-seed labels come first
        rng.integers(0, n, size=(300, n))
    draws = rng.integers(0, 3, size=(300, 3))
    ratios = [(np.mean([finals[i] for i in draw]) - 0.9) / (0.4 - 0.9) for draw in draws]
    assert row["relative_robustness_lower"] == pytest.approx(np.percentile(ratios, 2.5))
    assert row["relative_robustness_upper"] == pytest.approx(np.percentile(ratios, 97.5))
    # Ratios 0.8 (0.5), 0.4 (0.7), 0.9 (0.45): the interval lies within (0, 1).
    assert row["significance"]["final"] == {"above_unlearned": True, "versus_oracle": "below"}


def test_one_seed_with_items_gets_an_item_interval_and_a_verdict(tmp_path):
    rng = np.random.default_rng(5)

    def items(p_final: float, n: int = 60) -> list[list[float]]:
        return [[0.0] * n, (rng.random(n) < p_final).astype(float).tolist()]

    dirs = [_seed_dir(tmp_path, name, [], items(p)) for name, p in
            (("unlearned", 0.9), ("oracle", 0.3), ("undo", 0.35))]
    report = build_report([str(d) for d in dirs], samples=500)
    row = next(r for r in report["rows"] if r["model"] == "undo")
    assert row["forget_after_lower"] < row["forget_after"] < row["forget_after_upper"]
    assert row["relative_robustness_lower"] < row["relative_robustness"] \
        < row["relative_robustness_upper"]
    assert row["significance"]["final"]["above_unlearned"] is True
    assert row["significance"]["final"]["versus_oracle"] == "level"
    unl = next(r for r in report["rows"] if r["model"] == "unlearned")
    assert unl["relative_robustness"] == 0.0 and unl["relative_robustness_lower"] is None
    curve = report["curves"]["undo"]
    assert curve[-1]["lower"] <= curve[-1]["value"] <= curve[-1]["upper"]
    # More resamples, the same seed: a repeatable interval; another seed: a different one.
    again = build_report([str(d) for d in dirs], samples=500)
    assert again["rows"] == report["rows"]
    other = build_report([str(d) for d in dirs], samples=500, seed=1)
    assert other["rows"][2]["relative_robustness_lower"] != row["relative_robustness_lower"]


def test_report_markdown_states_the_verdict(cli, tmp_path):
    unlearned = _seed_dir(tmp_path, "unl", [0.1, 0.8, 0.9])
    oracle = _seed_dir(tmp_path, "ora", [0.0, 0.3, 0.4])
    seeds = [_seed_dir(tmp_path / "a", f"s{i}", [0.1, v, v]) for i, v in
             enumerate((0.5, 0.55, 0.45))]
    out = tmp_path / "report"
    result = cli("report", f"unlearned={unlearned}", f"oracle={oracle}",
                 *[f"undo={d}" for d in seeds], "--out", out, "--bootstrap-samples", 200)
    assert result.exit_code == 0, result.stderr
    text = (out / "report.md").read_text()
    assert "## Is it significant?" in text
    assert "**undo**, after the attack: relative robustness 80% [" in text
    headline = text.index("**undo**, over the attack (AUC, the headline)")
    assert headline < text.index("**undo**, after the attack")  # the AUC verdict comes first
    assert "significantly more robust than the unlearned model" in text
    assert "| undo | 3 |" in text
    data = json.loads((out / "report.json").read_text())
    assert data["uncertainty"]["samples"] == 200
    assert data["headline"] == "relative_robustness_auc"
    assert "undo.json" in {p.name for p in out.iterdir()}


def test_report_refuses_a_glob_that_matches_nothing(cli, tmp_path):
    result = cli("report", f"undo={tmp_path / 'nothing-*'}", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "matches no directory" in result.stderr
    assert not (tmp_path / "r").exists()


def test_percentages_never_print_minus_zero():
    from undo_cli.report import with_interval

    row = {"r": -0.001, "r_lower": -0.004, "r_upper": 0.2}
    assert with_interval(row, "r", pct=True) == "0% [0%, 20%]"
    assert with_interval({"r": -0.02}, "r", pct=True) == "-2%"


def test_compute_figure_shows_auc_and_final_points_the_frontier_and_one_colour_each():
    from matplotlib.colors import to_hex

    from undo_cli.plots import model_colours, plot_frontier

    def row(model, compute, final, auc):
        return {"model": model, "relative_compute": compute, "relative_robustness": final,
                "relative_robustness_lower": final - 0.1, "relative_robustness_upper": final + 0.1,
                "relative_robustness_auc": auc, "relative_robustness_auc_lower": auc - 0.05,
                "relative_robustness_auc_upper": auc + 0.05}

    rows = [row("undo-0.2", 0.2, 0.1, 0.3), row("undo-0.6", 0.5, 0.5, 0.7),
            row("unlearned", 0.05, 0.0, 0.0), row("oracle", 1.0, 1.0, 1.0)]
    report = {"rows": rows, "curves": {}, "roles": {"unlearned": "unlearned",
                                                    "oracle": "oracle", "base": ""}}
    colours = model_colours([r["model"] for r in rows])
    assert len({to_hex(c) for c in colours.values()}) == len(rows)
    ax = plot_frontier(report, colours).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    # The AUC frontier runs from the unlearned model through the students, sorted by
    # compute, to the oracle; the straight reference line joins the two ends.
    frontier = lines["frontier (AUC)"]
    assert list(frontier.get_xdata()) == [5.0, 20.0, 50.0, 100.0]
    assert list(frontier.get_ydata()) == pytest.approx([0.0, 30.0, 70.0, 100.0])
    straight = lines["unlearned to oracle, straight"]
    assert list(straight.get_xdata()) == [5.0, 100.0]
    # Every model: a filled AUC point and a hollow final point, in its own colour, each with
    # its interval.
    for r in rows:
        points = [line for line in ax.get_lines() if line.get_color() is not None
                  and list(line.get_ydata()) in ([r["relative_robustness_auc"] * 100],
                                                 [r["relative_robustness"] * 100])
                  and to_hex(line.get_color()) == to_hex(colours[r["model"]])]
        faces = {to_hex(p.get_markerfacecolor()) for p in points}
        assert "#ffffff" in faces and to_hex(colours[r["model"]]) in faces
    assert len(ax.collections) >= 2 * len(rows)  # the error bars
    # One alpha: no frontier.
    one = {**report, "rows": rows[1:]}
    assert "frontier (AUC)" not in {line.get_label() for line in plot_frontier(
        one, colours).axes[0].get_lines()}


def test_a_long_curve_is_pooled_by_step_and_a_longer_one_refused(cli, tmp_path):
    # Three seeds of 5,000 points (the most undo reads), the third missing step 10: the
    # pooled curve is the mean of the seeds on their common steps (the report indexed every
    # step by a scan: quadratic, 200,000 points did not finish in 180 s).
    rng = np.random.default_rng(0)
    curves = [rng.random(5_000) for _ in range(3)]
    dirs = [_seed_dir(tmp_path, f"s{i}", c.tolist()) for i, c in enumerate(curves)]
    third = json.loads((dirs[2] / "results.json").read_text())
    third["worst_case"] = [p for p in third["worst_case"] if p["step"] != 10]
    (dirs[2] / "results.json").write_text(json.dumps(third))
    report = build_report([f"m={d}" for d in dirs], samples=50)
    curve = report["curves"]["m"]
    assert len(curve) == 4_999 and curve[0]["step"] == 0 and curve[1]["step"] == 20
    assert curve[1]["value"] == pytest.approx(np.mean([c[2] for c in curves]))
    assert curve[-1]["value"] == pytest.approx(np.mean([c[-1] for c in curves]))
    assert all(p["lower"] <= p["value"] <= p["upper"] for p in curve[:50])
    longer = _seed_dir(tmp_path, "long", rng.random(5_001).tolist())
    result = cli("report", longer, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert f"{longer / 'results.json'}: 'worst_case' has 5,001 points" in result.stderr
    assert not (tmp_path / "r").exists()


def test_too_many_item_values_are_refused(cli, tmp_path, monkeypatch):
    import undo_cli.records

    monkeypatch.setattr(undo_cli.records, "MAX_CURVE_ITEM_VALUES", 29)
    ok = _seed_dir(tmp_path, "ok", [], items=[[1.0, 1.0, 1.0]] * 8 + [[0.0, 0.0, 0.0]])
    row = build_report([f"m={ok}"], samples=20)["rows"][0]
    assert row["forget_after_lower"] == row["forget_after_upper"] == 0.0  # the edge, exactly
    bad = _seed_dir(tmp_path, "bad", [], items=[[1.0, 0.0, 1.0]] * 10)
    result = cli("report", bad, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert (f"{bad / 'results.json'}: 'worst_case' keeps 30 per-item values; undo reads at "
            "most 29") in result.stderr
    # Points keeping different items crashed the bootstrap (ValueError, exit 1).
    mixed = _seed_dir(tmp_path, "mixed", [], items=[[1.0, 0.0, 1.0], [0.0, 1.0]])
    result = cli("report", mixed, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "'items' of different lengths [2, 3]" in result.stderr
    assert not (tmp_path / "r").exists()
