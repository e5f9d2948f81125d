"""`--fail-if` gates on `undo eval` (exit 0 / 3 / 2), `--reference`, and the shared gate helpers
of `undo_cli.gates` (also used by `undo relearn-attack`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from undo_cli.errors import EXIT_GATE, GateFailed
from undo_cli.gates import check_gates, describe_gate, parse_gates, raise_failed_gates


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-data")
    return {
        "forget": write_jsonl(root / "forget.jsonl", [
            {"prompt": f"{a} * {a} = ", "answer": a * a} for a in range(2, 8)]),
        "retain": write_jsonl(root / "retain.jsonl", [
            {"prompt": f"{a} + {a} = ", "answer": a + a} for a in range(2, 8)]),
        "lm": write_jsonl(root / "lm.jsonl", [{"text": f"{a} + 1 = {a + 1}"} for a in range(6)]),
        "mc": write_jsonl(root / "mc.jsonl", [
            {"question": f"{a} + 1 =", "choices": [str(a + 1), "no"], "answer": 0}
            for a in range(4)]),
    }


def data_args(files: dict[str, Path], *names: str) -> list[str]:
    out = []
    for name in names or ("forget", "retain"):
        out += ["--data", f"{name}={files[name]}"]
    return out


def run_eval(cli, ckpts, files, *extra, sets=()):
    ckpts = ckpts if isinstance(ckpts, (list, tuple)) else [ckpts]
    return cli("eval", *ckpts, *data_args(files, *sets), "--max-new-tokens", "3", *extra)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture()
def no_model_load(monkeypatch):
    import undo_cli.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("no model may be loaded")

    monkeypatch.setattr(checkpoint, "load_model", refuse)


# --------------------------------------------------------------------------------------------
# Passing and failing gates
# --------------------------------------------------------------------------------------------


def test_passing_gates_exit_0_with_the_gates_in_the_json(cli, tiny_llama, files):
    r = run_eval(cli, tiny_llama, files, "--json", "--fail-if", "forget.accuracy > 0.5",
                 "--fail-if", "retain.loss < 0 or retain.n != 6")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # still exactly one JSON document on stdout
    metrics = payload["results"][0]["metrics"]
    assert payload["gates"] == [
        {"checkpoint": str(tiny_llama), "expression": "forget.accuracy > 0.5", "failed": False,
         "values": {"forget.accuracy": metrics["forget"]["accuracy"]}},
        {"checkpoint": str(tiny_llama), "expression": "retain.loss < 0 or retain.n != 6",
         "failed": False, "values": {"retain.loss": metrics["retain"]["loss"],
                                     "retain.n": 6}},
    ]
    assert "gate passed: forget.accuracy > 0.5 (forget.accuracy = 0) for" in r.stderr
    assert error_lines(r) == []


def test_a_failed_gate_exits_3_after_printing_the_results(cli, tiny_llama, files):
    r = run_eval(cli, tiny_llama, files, "--json", "--fail-if", "forget.loss > 0.5",
                 "--fail-if", "retain.accuracy > 0.5")
    assert r.exit_code == EXIT_GATE == 3, r.output
    payload = json.loads(r.stdout)  # the results came out first
    loss = payload["results"][0]["metrics"]["forget"]["loss"]
    assert [g["failed"] for g in payload["gates"]] == [True, False]
    assert error_lines(r) == [
        f"error: gate failed: forget.loss > 0.5 (forget.loss = {loss:.4g}) for {tiny_llama}"]
    assert r.stderr.rstrip().endswith(str(tiny_llama))  # the error is the last line


def test_the_table_run_fails_the_same_way(cli, tiny_llama, files):
    r = run_eval(cli, tiny_llama, files, "--fail-if", "retain.n >= 6")
    assert r.exit_code == 3, r.output
    assert r.stdout == ""
    assert "checkpoint" in r.stderr  # the table was printed
    assert error_lines(r) == [f"error: gate failed: retain.n >= 6 (retain.n = 6) for "
                              f"{tiny_llama}"]


def test_every_checkpoint_must_pass(cli, tiny_llama, tiny_gpt2, files):
    first = run_eval(cli, [tiny_llama, tiny_gpt2], files, "--json", sets=("lm",))
    assert first.exit_code == 0, first.output
    losses = [res["metrics"]["lm"]["loss"] for res in json.loads(first.stdout)["results"]]
    assert losses[0] != losses[1]
    middle = sum(losses) / 2
    worse = [tiny_llama, tiny_gpt2][losses.index(max(losses))]
    r = run_eval(cli, [tiny_llama, tiny_gpt2], files, "--json", "--fail-if",
                 f"lm.loss > {middle!r}", sets=("lm",))
    assert r.exit_code == 3, r.output
    gates = json.loads(r.stdout)["gates"]
    assert [(g["checkpoint"], g["failed"]) for g in gates] == [
        (str(tiny_llama), losses[0] > middle), (str(tiny_gpt2), losses[1] > middle)]
    (line,) = error_lines(r)
    assert line.endswith(f" for {worse}") and line.count(" for ") == 1


# --------------------------------------------------------------------------------------------
# --reference: teacher.SET.METRIC / reference.SET.METRIC
# --------------------------------------------------------------------------------------------


def test_reference_metrics_in_gates(cli, tiny_llama, tiny_gpt2, files):
    r = run_eval(cli, tiny_llama, files, "--json", "--reference", tiny_gpt2,
                 "--fail-if", "retain.accuracy < teacher.retain.accuracy - 0.03",
                 "--fail-if", "reference.forget.loss != teacher.forget.loss",
                 "--fail-if", "forget.loss > reference.forget.loss - 1000")
    assert r.exit_code == 3, r.output
    payload = json.loads(r.stdout)
    assert [res["checkpoint"] for res in payload["results"]] == [str(tiny_llama)]
    ref = payload["reference"]
    assert ref["checkpoint"] == str(tiny_gpt2)
    assert set(ref["metrics"]) == {"forget", "retain"}
    gates = payload["gates"]
    assert [g["failed"] for g in gates] == [False, False, True]
    assert gates[0]["values"]["teacher.retain.accuracy"] == ref["metrics"]["retain"]["accuracy"]
    assert gates[2]["values"] == {
        "forget.loss": payload["results"][0]["metrics"]["forget"]["loss"],
        "reference.forget.loss": ref["metrics"]["forget"]["loss"]}
    (line,) = error_lines(r)
    assert line.startswith("error: gate failed: forget.loss > reference.forget.loss - 1000 (")
    assert "evaluating " + str(tiny_gpt2) + " (reference)" in r.stderr


def test_reference_in_the_table_and_shared_with_a_candidate(cli, tiny_llama, tiny_gpt2, files):
    r = run_eval(cli, tiny_llama, files, "--reference", tiny_gpt2, sets=("lm",))
    assert r.exit_code == 0, r.output
    assert r.stderr.count("(reference)") == 2  # "evaluating ... (reference)" and a table row
    # The reference among the candidates is evaluated once.
    r = run_eval(cli, [tiny_llama, tiny_gpt2], files, "--json", "--reference", tiny_gpt2,
                 "--fail-if", "lm.loss != teacher.lm.loss", sets=("lm",))
    assert r.exit_code == 3, r.output
    assert r.stderr.count("evaluating ") == 2
    payload = json.loads(r.stdout)
    assert payload["reference"]["metrics"] == payload["results"][1]["metrics"]
    assert [g["failed"] for g in payload["gates"]] == [True, False]


# --------------------------------------------------------------------------------------------
# Refused before any work: exit 2, one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gate", "message"), [
    ("forget.accuracy >", "cannot parse --fail-if 'forget.accuracy >'"),
    ("forget.accuracy = 0", "use '==' to compare"),
    ("forget.accuracy", "is a number, not a condition"),
    ("__import__('os').system('false')", "cannot parse --fail-if"),
    ("forget.accuracy > 0.1 and", "ends early"),
])
def test_malformed_gates_exit_2_before_reading_anything(cli, tiny_llama, files, tmp_path,
                                                        no_model_load, gate, message):
    missing = tmp_path / "missing.jsonl"  # not even the data files are read first
    r = cli("eval", tiny_llama, "--data", f"forget={missing}", "--fail-if", gate)
    assert r.exit_code == 2, r.output
    (line,) = error_lines(r)
    assert message in line
    assert "missing.jsonl" not in r.stderr


@pytest.mark.parametrize(("gate", "sets", "message"), [
    ("forget.acc > 0.1", (), "did you mean 'forget.accuracy'?"),
    ("lm.accuracy > 0.1", ("lm",), "unknown name 'lm.accuracy'"),  # text sets: loss, ppl
    ("mc.loss > 1", ("mc",), "unknown name 'mc.loss'"),  # choice sets: accuracy(_norm)
    ("other.loss > 1", (), "unknown name 'other.loss'"),
    ("retain.accuracy < teacher.retain.accuracy", (), "give --reference CKPT"),
])
def test_unknown_names_exit_2_before_any_model_loads(cli, tiny_llama, files, no_model_load,
                                                     gate, sets, message):
    r = run_eval(cli, tiny_llama, files, "--fail-if", gate, sets=sets)
    assert r.exit_code == 2, r.output
    (line,) = error_lines(r)
    assert message in line


def test_known_names_per_shape(cli, tiny_llama, files):
    r = run_eval(cli, tiny_llama, files, "--json",
                 "--fail-if", "lm.ppl < 0 or lm.tokens < 0 or lm.n < 0",
                 "--fail-if", "mc.accuracy_norm < 0 or mc.accuracy < 0 or mc.n < 0",
                 "--fail-if", "forget.tokens < 0", sets=("lm", "mc", "forget"))
    assert r.exit_code == 0, r.output


def test_reference_problems_exit_2(cli, tiny_llama, files, tmp_path, no_model_load):
    r = run_eval(cli, tiny_llama, files, "--reference", tmp_path / "nope")
    assert r.exit_code == 2, r.output
    assert len(error_lines(r)) == 1
    r = run_eval(cli, tiny_llama, files, "--reference", tiny_llama, "--fail-if", "teacher > 1")
    assert r.exit_code == 2, r.output
    assert "unknown name 'teacher'" in error_lines(r)[0]
    r = cli("eval", tiny_llama, "--data", f"teacher={files['retain']}", "--reference",
            tiny_llama)
    assert r.exit_code == 2, r.output
    assert "reserved" in error_lines(r)[0]


# --------------------------------------------------------------------------------------------
# The shared helpers (undo_cli.gates)
# --------------------------------------------------------------------------------------------


def test_check_and_raise_failed_gates():
    gates = parse_gates(["a.x > 0.5", "b < a.x * 2", "a.x > 0.5 and b > 10"])
    records = check_gates(gates, {"a": {"x": 0.75}, "b": 1.0}, checkpoint="m1")
    assert records == [
        {"checkpoint": "m1", "expression": "a.x > 0.5", "failed": True,
         "values": {"a.x": 0.75}},
        {"checkpoint": "m1", "expression": "b < a.x * 2", "failed": True,
         "values": {"a.x": 0.75, "b": 1.0}},
        {"checkpoint": "m1", "expression": "a.x > 0.5 and b > 10", "failed": False,
         "values": {"a.x": 0.75, "b": 1.0}},
    ]
    assert describe_gate(records[1]) == "b < a.x * 2 (a.x = 0.75, b = 1) for m1"
    with pytest.raises(GateFailed) as caught:
        raise_failed_gates(records)
    assert caught.value.exit_code == 3
    assert str(caught.value) == ("2 gates failed: a.x > 0.5 (a.x = 0.75) for m1; "
                                 "b < a.x * 2 (a.x = 0.75, b = 1) for m1")
    raise_failed_gates(records[2:])  # nothing failed: no exception
    no_ckpt = check_gates(gates[:1], {"a.x": 0.9})
    assert describe_gate(no_ckpt[0]) == "a.x > 0.5 (a.x = 0.9)"


def test_parse_gates_checks_names():
    from undo_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown name 'a.y'"):
        parse_gates(["a.y > 1"], known=["a.x"])
    with pytest.raises(UsageError, match="--fail-if"):
        parse_gates(["a.x >"])
    assert [g.text for g in parse_gates(["a.x > 1"], known=["a.x"])] == ["a.x > 1"]
