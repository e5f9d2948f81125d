"""`undo distill` end to end on tiny models: KL falls, stop conditions, students, cache, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from undo_cli.checkpoint import load_model

STEPS = 12


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher trained briefly on additions, its data, an eval set and a perturbed copy."""
    import random

    from typer.testing import CliRunner

    from undo_cli.cli import app

    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(200)]
    text = _write(root / "text.jsonl", [{"text": f"{a} + {b} = {a + b}"} for a, b in pairs])
    evalset = _write(root / "eval.jsonl",
                     [{"prompt": f"{a} + {b} =", "answer": f" {a + b}"} for a, b in pairs[:12]])
    base = make_checkpoint(root / "init", hidden=32, intermediate=64)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result

    run("train", root / "teacher", "--init", base, "--data", text, "--max-steps", 60,
        "--lr", 3e-3, "--max-length", 32, "--batch-size", 16, "--quiet")
    run("perturb", root / "teacher", root / "noised", "--alpha", 0.6, "--beta", 0.1,
        "--seed", 0)
    return {"root": root, "text": text, "eval": evalset, "teacher": root / "teacher",
            "noised": root / "noised"}


def _distill(cli, setup, out, *extra):
    args = ["distill", out, "--teacher", setup["teacher"], "--data", setup["text"],
            "--max-length", 32, "--batch-size", 8, "--quiet", "--json", *extra]
    return cli(*args)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_distillation_lowers_kl_and_recovers_retain_loss(cli, setup, tmp_path):
    out = tmp_path / "student"
    result = _distill(cli, setup, out, "--student", setup["noised"], "--max-steps", 30,
                      "--log-every", 1, "--eval", f"retain={setup['eval']}", "--eval-every", 30,
                      "--lr", 3e-3)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    steps = [e for e in _log(out) if "kd_loss" in e and e.get("type") != "eval"]
    assert steps[-1]["kd_loss"] < 0.6 * steps[0]["kd_loss"]
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["stage"] == "distill"
    roles = {p["role"] for p in manifest["parents"]}
    assert roles == {"teacher", "student"}
    compute = manifest["compute"]
    params = sum(p.numel() for p in load_model(out).parameters())
    assert compute["flops_student"] == pytest.approx(6 * params * compute["tokens"])
    assert compute["flops_teacher"] == pytest.approx(2 * params * compute["tokens"])
    # The student's retain loss came back towards the teacher's (it starts far above).
    from undo_cli.checkpoint import load_tokenizer
    from undo_cli.evaluate import evaluate_model, load_eval_set

    tok = load_tokenizer(out)
    sets = [load_eval_set("retain", setup["eval"], tok)]
    before = evaluate_model(load_model(setup["noised"]), tok, sets, generate=False)
    after = summary["metrics"]["retain.loss"]
    teacher = summary["teacher_metrics"]["retain.loss"]
    assert after < before["retain"]["loss"]
    assert abs(after - teacher) < abs(before["retain"]["loss"] - teacher)
    assert load_model(out).config.vocab_size == load_model(setup["teacher"]).config.vocab_size


def test_stop_when_stops_at_the_first_eval_where_it_holds(cli, setup, tmp_path):
    out = tmp_path / "stopped"
    cond = "retain.loss <= teacher * 1.6"
    result = _distill(cli, setup, out, "--alpha", 0.2, "--beta", 0.1, "--max-steps", 60,
                      "--eval", f"retain={setup['eval']}", "--eval-every", 4,
                      "--stop-when", cond, "--lr", 3e-3)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    teacher = summary["teacher_metrics"]["retain.loss"]
    evals = [e for e in _log(out) if e.get("type") == "eval"]
    holds = [e["retain.loss"] <= teacher * 1.6 for e in evals]
    assert summary["stop_reason"].startswith("stop_when")
    assert holds[-1] and not any(holds[:-1])
    assert summary["steps"] == evals[-1]["step"] < 60


def test_alpha_beta_in_memory_equals_undo_perturb(setup):
    from undo_cli.distill import build_student
    from undo_cli.options import NoiseOptions

    teacher = load_model(setup["teacher"])
    student = build_student("teacher", teacher, NoiseOptions(alpha=0.6, beta=0.1), 0, seed=0)
    reference = load_model(setup["noised"])
    for (name, a), (_, b) in zip(student.state_dict().items(), reference.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in student.parameters())


def test_random_student_and_vocabulary_mismatch(cli, setup, tmp_path):
    result = _distill(cli, setup, tmp_path / "rand", "--student", "random", "--max-steps", 2)
    assert result.exit_code == 0, result.stderr
    other = make_checkpoint(tmp_path / "other", hidden=32, alphabet="abc")
    result = _distill(cli, setup, tmp_path / "bad", "--student", other, "--max-steps", 2)
    assert result.exit_code == 2 and "vocabularies differ" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--student", "random", "--temperature", "0"], "--temperature"),
    (["--alpha", "1.5", "--beta", "0.1"], "--alpha"),
    (["--alpha", "0.5"], "--alpha and --beta"),
    (["--student", "random", "--stop-when", "retain.loss <="], "stop-when"),
    (["--student", "random", "--stop-when", "retain.loss <= teacher"], "needs --eval"),
    (["--student", "/no/such/dir"], "not found"),
])
def test_bad_arguments_are_refused_before_work(args, message, cli, setup, tmp_path):
    result = _distill(cli, setup, tmp_path / "out", "--max-steps", 2, *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_stop_metric_is_refused(cli, setup, tmp_path):
    result = _distill(cli, setup, tmp_path / "out", "--student", "random", "--max-steps", 2,
                      "--eval", f"retain={setup['eval']}", "--stop-when", "forget.loss < 1")
    assert result.exit_code == 2 and "unknown metric" in result.stderr


def test_teacher_cache_reproduces_the_loss(cli, setup, tmp_path):
    vocab = load_model(setup["teacher"]).config.vocab_size
    common = ["--student", setup["noised"], "--max-steps", 5, "--log-every", 1]
    plain = _distill(cli, setup, tmp_path / "plain", *common)
    assert plain.exit_code == 0, plain.stderr
    cache = tmp_path / "cache"
    first = _distill(cli, setup, tmp_path / "c1", *common, "--cache-teacher", cache,
                     "--cache-topk", vocab)
    second = _distill(cli, setup, tmp_path / "c2", *common, "--cache-teacher", cache,
                      "--cache-topk", vocab)
    assert first.exit_code == 0 and second.exit_code == 0, second.stderr
    m2 = json.loads((tmp_path / "c2" / "undo.json").read_text())
    assert m2["compute"]["teacher_cache"]["hits"] == 5
    assert m2["compute"]["flops_teacher"] == 0
    # Read from the cache, the batches count as many tokens (and student FLOPs) as computed.
    m1 = json.loads((tmp_path / "c1" / "undo.json").read_text())
    assert m2["compute"]["tokens"] == m1["compute"]["tokens"] > 0
    assert m2["compute"]["flops_student"] == m1["compute"]["flops_student"] > 0
    assert [e["tokens"] for e in _log(tmp_path / "c2")] == [e["tokens"] for e in _log(
        tmp_path / "c1")]
    losses = {name: [e["kd_loss"] for e in _log(tmp_path / name) if "kd_loss" in e]
              for name in ("plain", "c1", "c2")}
    # k = vocabulary size: the cached loss is the exact loss (to fp32 rounding).
    for name in ("c1", "c2"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-4)
    # Other settings are refused rather than silently mixed.
    clash = _distill(cli, setup, tmp_path / "c3", *common, "--cache-teacher", cache,
                     "--cache-topk", 4)
    assert clash.exit_code == 2 and "other settings" in clash.stderr


def test_resume_after_interruption_equals_an_uninterrupted_run(cli, setup, tmp_path,
                                                               monkeypatch):
    import undo_cli.distill.run as distill

    common = ["--student", setup["noised"], "--max-steps", 8, "--save-every", 4]
    full = _distill(cli, setup, tmp_path / "full", *common)
    assert full.exit_code == 0, full.stderr

    original = distill.kd_loss_fn

    def interrupted(*args, **kwargs):
        inner = original(*args, **kwargs)
        calls = {"n": 0}

        def loss_fn(model, batches):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return inner(model, batches)

        return loss_fn

    monkeypatch.setattr(distill, "kd_loss_fn", interrupted)
    stopped = _distill(cli, setup, tmp_path / "resumed", *common)
    assert stopped.exit_code == 130 and "interrupted" in stopped.stderr
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.undo-state").is_dir()
    monkeypatch.setattr(distill, "kd_loss_fn", original)
    resumed = _distill(cli, setup, tmp_path / "resumed", *common, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] == 4
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert not (tmp_path / "resumed.undo-state").exists()
