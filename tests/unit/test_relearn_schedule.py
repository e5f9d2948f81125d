"""The evaluation schedule of `undo relearn-attack` (`--eval-schedule`, issue 28): the steps a
run is evaluated at, that the last step always is, that their number grows with the logarithm
of `--steps`, that the runs follow it, and that the AUC over its uneven steps is the
trapezoid over those steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_checkpoint, write_jsonl
from typer.testing import CliRunner

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.data import build_stream
from undo_cli.errors import UsageError
from undo_cli.evaluate import load_eval_set
from undo_cli.options import LINEAR_EVALUATIONS, AttackConfig, TrainConfig, evaluation_steps
from undo_cli.relearn import area_under_curve, run_attack
from undo_cli.stats import trapezoid_mean

RECORDS = [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a in range(6)
           for b in range(4)]


def test_the_log_schedule_steps():
    # every 1 step for 20 evaluations, then every 2 through step 40, every 4 through 80
    assert evaluation_steps(50, 1) == [*range(1, 21), *range(22, 41, 2), 44, 48, 50]
    assert evaluation_steps(50, 1, "linear") == list(range(1, 51))
    # at the default --eval-every 25: 500 steps as before; 2000 steps: 40, not 80
    assert evaluation_steps(500, 25) == list(range(25, 501, 25))
    assert evaluation_steps(2000, 25) == [*range(25, 501, 25), *range(550, 1001, 50),
                                          *range(1100, 2001, 100)]
    assert len(evaluation_steps(2000, 25, "linear")) == 80
    assert evaluation_steps(7, 25) == [7]  # a run shorter than one gap: its last step


@pytest.mark.parametrize("every", [1, 3, 25])
def test_every_schedule_ends_at_the_last_step_on_the_engines_steps(every):
    for steps in range(1, 60 * every, max(1, every // 3)):
        for schedule in ("log", "linear"):
            points = evaluation_steps(steps, every, schedule)
            assert points[-1] == steps
            assert points == sorted(set(points))
            # the engine calls the hook every `every` steps and at the end
            assert all(p % every == 0 for p in points[:-1])
        log, linear = evaluation_steps(steps, every), evaluation_steps(steps, every, "linear")
        if steps <= LINEAR_EVALUATIONS * every:  # short runs: evaluated as before
            assert log == linear
        else:
            assert set(log) <= set(linear)
            if steps > (LINEAR_EVALUATIONS + 1) * every:
                assert len(log) < len(linear)
            # no gap wider than 10% of the step it ends at (after the first 20)
            gaps = [(b - a, b) for a, b in zip(log, log[1:]) if b != steps]
            assert all(gap <= max(every, b / 10) for gap, b in gaps)


def test_the_number_of_evaluations_grows_with_the_log_of_the_steps():
    for doublings in range(8):
        steps = LINEAR_EVALUATIONS * 25 * 2 ** doublings
        assert len(evaluation_steps(steps, 25)) == LINEAR_EVALUATIONS + 10 * doublings
        assert len(evaluation_steps(steps, 25, "linear")) == LINEAR_EVALUATIONS * 2 ** doublings


def test_a_bad_schedule_is_refused():
    with pytest.raises(UsageError, match="--eval-schedule"):
        evaluation_steps(10, 1, "sqrt")
    with pytest.raises(UsageError, match="--eval-schedule"):
        AttackConfig(eval_schedule="sqrt")


def test_the_auc_on_uneven_steps_is_the_trapezoid_over_them():
    steps = [0, *evaluation_steps(200, 5)]  # 0, 5 ... 100, 110 ... 200
    values = [1 - math.exp(-s / 30) for s in steps]
    direct = sum((b - a) * (values[i] + values[i + 1]) / 2
                 for i, (a, b) in enumerate(zip(steps, steps[1:]))) / 200
    assert area_under_curve(list(zip(steps, values))) == pytest.approx(direct, rel=1e-12)
    assert trapezoid_mean(steps, np.asarray([values]))[0] == pytest.approx(direct, rel=1e-12)
    # not the plain mean of the points, which weighs the dense early steps more
    assert abs(float(np.mean(values)) - direct) > 0.05
    # and close to the exact mean of the curve (the schedule loses little on a smooth one)
    exact = 1 - 30 / 200 * (1 - math.exp(-200 / 30))
    assert direct == pytest.approx(exact, abs=0.005)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedule")
    ckpt = make_checkpoint(root / "model", hidden=32, intermediate=64)
    data = write_jsonl(root / "forget.jsonl", RECORDS)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    return {"root": root, "ckpt": ckpt, "data": data, "model": model, "tok": tok,
            "sets": [load_eval_set("forget", data, tok, limit=8)]}


STEPS = 30


@pytest.fixture(scope="module")
def attacks(setup):
    """The same attack (2 learning rates, 30 steps, --eval-every 1) on either schedule."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for schedule in ("log", "linear"):
        config = AttackConfig(lrs=[1e-3, 1e-2], steps=STEPS, eval_schedule=schedule,
                              train=TrainConfig(schedule="constant", max_steps=1,
                                                batch_size=2, eval_every=1))
        out[schedule] = run_attack(
            setup["model"], setup["tok"], setup["sets"], config, forget_metric="forget.loss",
            make_stream=lambda seed, bs: build_stream(setup["tok"], [str(setup["data"])], 16,
                                                      bs, seed, name="attack"))
    return out


@pytest.mark.parametrize("schedule", ["log", "linear"])
def test_the_runs_are_evaluated_on_the_schedule(attacks, schedule):
    res = attacks[schedule]
    expected = [0, *evaluation_steps(STEPS, 1, schedule)]
    assert len(expected) == (26 if schedule == "log" else 31)
    for run in res["runs"]:
        assert [e["step"] for e in run["curve"]] == expected
        assert [c["step"] for c in run["cost"]] == expected
    assert [e["step"] for e in res["worst_case"]] == expected
    # one shared step-0 evaluation, then each run's own
    assert res["timing"]["evaluations"] == 1 + 2 * (len(expected) - 1)
    pts = [(e["step"], e["value"]) for e in res["worst_case"]]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    assert res["summary"]["auc"] == pytest.approx(area / STEPS)
    assert res["summary"]["final"] == pts[-1][1]


def test_the_schedule_changes_only_where_runs_are_measured(attacks):
    """Evaluating less often does not change training: every point of the log schedule is
    the linear schedule's point at that step, bit for bit (so the final value is the same,
    and the AUC is the trapezoid over a subset of the same curve)."""
    log, linear = attacks["log"], attacks["linear"]
    for run_log, run_linear in zip(log["runs"], linear["runs"]):
        at = {e["step"]: e for e in run_linear["curve"]}
        assert run_log["curve"] == [at[e["step"]] for e in run_log["curve"]]
        assert run_log["tokens"] == run_linear["tokens"]
        assert run_log["train_loss"] == run_linear["train_loss"]
    assert log["summary"]["final"] == linear["summary"]["final"]
    subset = [(e["step"], e["value"]) for e in linear["worst_case"]
              if e["step"] in {0, *evaluation_steps(STEPS, 1)}]
    assert log["summary"]["auc"] == pytest.approx(area_under_curve(subset), rel=1e-12)


def test_results_json_records_the_schedule(setup, tmp_path):
    from undo_cli.cli import app

    out = tmp_path / "attack"
    r = CliRunner().invoke(app, [str(a) for a in (
        "relearn-attack", setup["ckpt"], "--data", setup["data"], "--eval",
        f"forget={setup['data']}", "--eval-limit", 4, "--lrs", "1e-3", "--steps", 12,
        "--eval-every", 1, "--eval-schedule", "linear", "--batch-size", 2, "--max-length",
        16, "--out", out, "--no-plot", "--quiet")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["attack"]["eval_schedule"] == "linear" and res["attack"]["eval_every"] == 1
    assert [e["step"] for e in res["runs"][0]["curve"]] == list(range(13))
    r = CliRunner().invoke(app, ["relearn-attack", str(setup["ckpt"]), "--data",
                                 str(setup["data"]), "--eval-schedule", "sqrt",
                                 "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "--eval-schedule" in r.output
