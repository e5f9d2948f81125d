"""`undo report`'s attack matrix (`undo_cli.matrix`): the oracle-controlled verdict on
constructed results where the answer is known (a model above the oracle, one level with it,
one that collapses, an attack the oracle gains from as much), attacker-cost curves and the
compute to half the base's recovery, the table, the heat map and `--fail-if` on a cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from undo_cli.gates import matrix_gate_values, rewrite_string_tests
from undo_cli.matrix import attack_matrix, compute_to_reach
from undo_cli.report import build_report, render_markdown

SE = 0.01  # every evaluation's standard error: small, so that the verdicts are clear-cut


def _run(attack: str, config: str, points: list[tuple], static: bool = False) -> dict:
    """points: (step, forget value, retain value, attacker FLOPs)."""
    return {"attack": attack, "config": config, "static": static, "seed": 0,
            "quantize": None,
            "curve": [{"step": s, "forget.accuracy": v, "forget.accuracy_stderr": SE,
                       "retain.accuracy": r} for s, v, r, _ in points],
            "cost": [{"step": s, "tokens": int(f / 100), "flops": f} for s, _, _, f in points]}


def _results(before: float, runs: list[dict], final: float | None = None) -> dict:
    values = [e["forget.accuracy"] for r in runs for e in r["curve"]]
    final = max(values + [before]) if final is None else final
    return {"checkpoint": "m", "fingerprint": "x", "forget_metric": "forget.accuracy",
            "direction": "max", "attack": {},
            "initial": {"forget.accuracy": before, "forget.accuracy_stderr": SE,
                        "retain.accuracy": 0.9},
            "runs": runs, "worst_case": [{"step": 0, "value": before},
                                         {"step": 10, "value": final}],
            "summary": {"final": final, "auc": (before + final) / 2}}


def _models() -> dict[str, list[dict]]:
    return {
        "oracle": [_results(0.0, [
            _run("finetune", "ft", [(0, 0.0, 0.9, 0), (10, 0.2, 0.9, 1e6)]),
            _run("prune", "prune magnitude:0.5", [(0, 0.6, 0.9, 0)], static=True)])],
        "above": [_results(0.0, [
            _run("finetune", "ft", [(0, 0.0, 0.9, 0), (5, 0.5, 0.9, 5e5),
                                    (10, 0.8, 0.9, 1e6)]),
            _run("prune", "prune magnitude:0.5", [(0, 0.6, 0.9, 0)], static=True)])],
        "level": [_results(0.0, [
            _run("finetune", "ft", [(0, 0.0, 0.9, 0), (10, 0.205, 0.9, 1e6)]),
            _run("prune", "prune magnitude:0.5", [(0, 0.1, 0.9, 0)], static=True)])],
        "collapsed": [_results(0.0, [
            _run("finetune", "ft", [(0, 0.0, 0.9, 0), (5, 0.21, 0.88, 5e5),
                                    (10, 0.95, 0.3, 1e6)]),
            _run("prune", "prune magnitude:0.5", [(0, 0.0, 0.9, 0)], static=True)])],
        "base": [_results(0.9, [
            _run("finetune", "ft", [(0, 0.9, 0.9, 0), (10, 1.0, 0.9, 1e6)])], final=1.0)],
    }


def test_verdicts_on_constructed_results():
    m = attack_matrix(_models(), oracle="oracle", retain_metric="retain.accuracy",
                      max_retain_drop=0.1, samples=4000, seed=1)
    assert m["families"] == ["finetune", "prune"]
    ft, prune = m["cells"]["finetune"], m["cells"]["prune"]
    # above the oracle: 0.8 vs 0.2, far outside the noise
    assert ft["above"]["verdict"] == ft["above"]["verdict_no_limit"] == "recovered"
    assert ft["above"]["difference"] == pytest.approx(0.6)
    assert ft["above"]["lower"] < 0.6 < ft["above"]["upper"]
    assert ft["above"]["lower"] > 0.5 and ft["above"]["upper"] < 0.7  # se sqrt(2) * 0.01
    # level with the oracle: 0.205 vs 0.2
    assert ft["level"]["verdict"] == "level"
    assert ft["level"]["lower"] < 0 < ft["level"]["upper"]
    # collapsed: 0.95 only where retain fell from 0.9 to 0.3; with the limit its worst
    # case is 0.21 (level), without it 0.95 (recovered), and it is named
    assert ft["collapsed"]["collapsed"] is True
    assert ft["collapsed"]["worst"] == pytest.approx(0.21)
    assert ft["collapsed"]["worst_no_limit"] == pytest.approx(0.95)
    assert ft["collapsed"]["verdict"] == "level"
    assert ft["collapsed"]["verdict_no_limit"] == "recovered"
    assert ft["above"]["collapsed"] is False
    # pruning gives the oracle as much as the model: the attack teaches
    assert prune["above"]["verdict"] == "teaches"
    assert prune["above"]["oracle_gain"] == pytest.approx(0.6)
    # ... also for a model that gains less than the oracle from it
    assert prune["level"]["verdict"] == "teaches"
    assert ft["oracle"]["verdict"] == "oracle"
    assert m["cells"]["prune"]["base"]["attacked"] is False


def test_attacker_compute_to_half_the_base_recovery():
    cost = compute_to_reach(_models(), base="base", retain_metric="retain.accuracy",
                            max_retain_drop=0.1, samples=4000, seed=0)
    above = cost["above"]
    # target: before + (P_base - before) / 2 = 0 + (1.0 - 0) / 2 = 0.5
    assert above["target"] == pytest.approx(0.5)
    assert above["reached"] is True
    # the worst case within each budget: 0.6 (static pruning, free), then 0.8 at 1e6
    assert above["flops"] == [0.0, 0.0, 5e5, 1e6]
    assert above["value"] == [0.0, 0.6, 0.6, 0.8]
    # ... which reaches the target already at 0 FLOPs: pruning is free
    assert above["flops_to_target"] == 0.0
    # finetuning alone reaches it at 5e5 FLOPs
    cost_ft_only = compute_to_reach({k: [dict(v[0], runs=v[0]["runs"][:1])]
                                     for k, v in _models().items()}, base="base",
                                    retain_metric="retain.accuracy", max_retain_drop=0.1,
                                    samples=4000, seed=0)
    assert cost_ft_only["above"]["flops_to_target"] == pytest.approx(5e5)
    assert cost_ft_only["above"]["lower"] <= 5e5 <= cost_ft_only["above"]["upper"]
    assert cost_ft_only["level"]["reached"] is False
    assert cost_ft_only["level"]["upper"] is None  # not reached within the budget
    assert cost_ft_only["collapsed"]["reached"] is False  # 0.95 is beyond the utility limit
    # a base that ends no higher than a model starts leaves nothing to recover: no target
    flat = _models()
    flat["base"] = [_results(0.0, flat["base"][0]["runs"], final=0.0)]
    assert compute_to_reach(flat, base="base", retain_metric="retain.accuracy",
                            max_retain_drop=0.1, samples=100)["above"]["target"] is None


def test_fail_if_names_and_verdict_strings():
    m = attack_matrix(_models(), oracle="oracle", retain_metric="retain.accuracy",
                      samples=500)
    values = matrix_gate_values(m)
    assert values["matrix.finetune.above.verdict_is_recovered"] == 1.0
    assert values["matrix.prune.above.verdict_is_teaches"] == 1.0
    assert values["matrix.finetune.collapsed.collapsed"] == 1.0
    assert rewrite_string_tests('matrix.prune.undo.verdict == "recovered"') == \
        "matrix.prune.undo.verdict_is_recovered == 1"
    assert rewrite_string_tests("matrix.prune.undo.verdict_no_limit != 'below oracle'") == \
        "matrix.prune.undo.verdict_no_limit_is_below_oracle != 1"


def _write(root: Path, label: str, results: dict) -> Path:
    d = root / label
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_report_writes_the_matrix_and_gates_on_a_cell(cli, tmp_path):
    dirs = [_write(tmp_path, label, seeds[0]) for label, seeds in _models().items()]
    specs = [f"{d.name}={d}" for d in dirs]
    report = build_report(specs, roles={"oracle": "oracle", "base": "base", "unlearned": ""},
                          samples=500)
    text = render_markdown(report)
    assert "## Attack matrix" in text and "## Attacker compute" in text
    assert "not reached within the budget" in text and "*collapsed*" in text
    out = tmp_path / "report"
    r = cli("report", *specs, "--out", out, "--bootstrap-samples", "500",
            "--fail-if", 'matrix.finetune.above.verdict == "recovered"')
    assert r.exit_code == 3, r.output
    assert "matrix.finetune.above.verdict" in r.output
    written = json.loads((out / "report.json").read_text())
    assert written["matrix"]["cells"]["finetune"]["above"]["verdict"] == "recovered"
    assert written["gates"][0]["failed"] is True
    assert (out / "matrix.png").stat().st_size > 0
    assert (out / "attacker_cost.png").stat().st_size > 0
    ok = cli("report", *specs, "--out", tmp_path / "r2", "--bootstrap-samples", "500",
             "--fail-if", 'matrix.finetune.level.verdict == "recovered"')
    assert ok.exit_code == 0, ok.output
    bad = cli("report", *specs, "--out", tmp_path / "r3", "--fail-if",
              "matrix.finetune.nobody.worst > 0")
    assert bad.exit_code == 2 and "matrix.finetune.nobody.worst" in bad.output
    assert not (tmp_path / "r3").exists()


def test_report_refuses_a_malformed_gate_before_reading_anything(cli, tmp_path):
    for gate, message in (("matrix.finetune.x.verdict == 'won'", "a verdict is one of"),
                          ("matrix.finetune.x.worst >", "cannot parse --fail-if")):
        r = cli("report", f"x={tmp_path / 'nowhere'}", "--out", tmp_path / "r", "--fail-if",
                gate)
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        assert "--fail-if" in line and message in line and "nowhere" not in line


def test_attacker_cost_pools_seeds_by_configuration_and_step():
    def seed(value_at_5: float) -> dict:
        return _results(0.0, [_run("finetune", "ft", [(0, 0.0, 0.9, 0),
                                                     (5, value_at_5, 0.9, 5e5),
                                                     (10, 0.45, 0.9, 1e6)])])

    models = {"base": _models()["base"], "m": [seed(0.4), seed(0.62)]}
    cost = compute_to_reach(models, base="base", retain_metric="retain.accuracy",
                            max_retain_drop=0.1, samples=100)["m"]
    # step 5: mean 0.51 >= the target 0.5, though one seed alone (0.4) would not reach it
    assert cost["value"] == pytest.approx([0.0, 0.51, 0.51])
    assert cost["flops_to_target"] == pytest.approx(5e5)
    m = attack_matrix(models, oracle=None, retain_metric="retain.accuracy", samples=100)
    assert m["cells"]["finetune"]["m"]["worst"] == pytest.approx((0.45 + 0.62) / 2)
