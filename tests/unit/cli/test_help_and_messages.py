"""What a user reads: every command's --help, the percentages of reports, the attack plot's
lines, and the one-line errors of mistyped options (issue 20, point 13)."""

from __future__ import annotations

import re

import pytest
from conftest import make_checkpoint, write_jsonl

from undo_cli.report import _fmt, with_interval

COMMANDS = ["", "init", "train", "unlearn", "distill", "perturb", "eval", "relearn-attack",
            "probe", "report", "plan", "data", "data arithmetic", "data facts"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_placeholders(cli, command, monkeypatch):
    """No `<bool>` metavar on a flag and no `{IN}`-style placeholder braces (record shapes
    such as {"text"} or {question, choices, answer} are fine)."""
    monkeypatch.setenv("COLUMNS", "200")
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "<list[" not in result.output
    assert not re.search(r"\{[A-Za-z_]+\}", result.output), result.output


@pytest.mark.parametrize(("value", "shown"), [(-0.004, "0%"), (-0.0, "0%"), (0.004, "0%"),
                                              (-0.006, "-1%"), (0.53, "53%"), (None, "n/a")])
def test_percentages_never_read_minus_zero(value, shown):
    assert _fmt(value, pct=True) == shown


def test_intervals_never_read_minus_zero():
    row = {"r": 0.1, "r_lower": -0.003, "r_upper": 0.3}
    assert with_interval(row, "r", pct=True) == "10% [0%, 30%]"


def _attack_results(lrs: list[float]) -> dict:
    runs = []
    for i, lr in enumerate(lrs):
        curve = [{"step": s, "forget.accuracy": min(1.0, (i + 1) * s / 40)} for s in (0, 5, 10)]
        runs.append({"lr": lr, "seed": 0, "config": f"adamw constant bs8 lr{lr:g}",
                     "curve": curve})
    # the largest learning rate's run is the worst case at every step
    worst = [{"step": e["step"], "value": e["forget.accuracy"], "lower": None, "upper": None}
             for e in runs[-1]["curve"]]
    return {"forget_metric": "forget.accuracy", "runs": runs, "worst_case": worst,
            "summary": {"threshold": 0.5}, "attack": {"mode": "full"},
            "checkpoint": "/tmp/model"}


@pytest.mark.parametrize("n_lrs", [3, 9, 14])
def test_worst_case_line_leaves_the_largest_lr_visible(n_lrs, tmp_path, monkeypatch):
    """The worst-case line is dashed, thinner than two run lines, drawn beneath the runs;
    no run is drawn in yellow (tab10's olive or viridis' end) or the threshold's grey."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    from undo_cli.plots import plot_attack

    figures = []
    real_savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    lrs = [10.0 ** (-6 + k / 2) for k in range(n_lrs)]
    plot_attack(_attack_results(lrs), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    lines = figures[0].axes[0].get_lines()
    worst = next(ln for ln in lines if ln.get_label() == "worst case")
    runs = [ln for ln in lines if ln.get_label().startswith("adamw") or
            (ln.get_label().startswith("_") and ln.get_linestyle() == "-")]
    assert len(runs) == n_lrs
    assert worst.get_linestyle() != "-"
    assert worst.get_linewidth() < 2 * min(r.get_linewidth() for r in runs)
    assert worst.get_zorder() < min(r.get_zorder() for r in runs)
    for run in runs:
        r, g, b = to_rgb(run.get_color())
        assert not (r > 0.6 and g > 0.6 and b < 0.35), (run.get_label(), (r, g, b))  # yellow
        assert not (abs(r - g) < 0.05 and abs(g - b) < 0.05), run.get_label()  # grey / black


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    return {"model": make_checkpoint(root / "m"),
            "text": write_jsonl(root / "t.jsonl", [{"text": "abc abc"}] * 4), "root": root}


@pytest.mark.parametrize(("args", "message"), [
    (["--student", "teacher"], "--student teacher noises the teacher in memory: give --alpha"),
    (["--student", "teacher", "--alpha", "0.5"], "--alpha and --beta go together"),
    ([], "--student is needed"),
])
def test_distill_student_teacher_errors(cli, small, args, message):
    out = small["root"] / "never"
    result = cli("distill", out, "--teacher", small["model"], "--data", small["text"], *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "unlearn", "distill", "relearn-attack"])
@pytest.mark.parametrize(("suffix", "message"), [
    (":abc", "the weight after ':' must be a number (got 'abc')"),
    (":", "the weight after ':' must be a number (got nothing)"),
    (":-1", "the weight must be a positive finite number (got -1)"),
])
def test_bad_weight_suffix_is_named(cli, small, command, suffix, message):
    spec = f"{small['text']}{suffix}"
    out = small["root"] / "never"
    flag = {"unlearn": "--forget"}.get(command, "--data")
    args = {
        "train": ["train", out, "--init", small["model"], "--data", spec],
        "unlearn": ["unlearn", small["model"], out, "--method", "maxent", "--forget", spec],
        "distill": ["distill", out, "--teacher", small["model"], "--student", "random",
                    "--data", spec],
        "relearn-attack": ["relearn-attack", small["model"], "--data", spec, "--eval",
                           f"t={small['text']}", "--out", out],
    }[command]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert f"error: {flag} '{spec}': {message}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_path_with_a_colon_is_still_a_path(tmp_path, monkeypatch):
    from undo_cli.records import parse_weighted_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b.jsonl").write_text("")
    assert parse_weighted_spec("a:b.jsonl") == ("a:b.jsonl", 1.0)
    assert parse_weighted_spec("a:b.jsonl:2") == ("a:b.jsonl", 2.0)
    assert parse_weighted_spec("nowhere:x") == ("nowhere:x", 1.0)  # not found later
