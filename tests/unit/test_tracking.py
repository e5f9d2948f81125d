"""`--report-to` (issue 29): TensorBoard event files written by tiny runs, read back with
TensorBoard's own event reader, hold the loss and the evaluation metrics at their steps; a
tracker that is not installed is refused before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import make_checkpoint, write_jsonl

from undo_cli.tracking import entry_values, flatten

pytest.importorskip("tensorboard")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the event files in `directory` (not its subdirectories)."""
    from tensorboard.backend.event_processing import event_accumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            curves.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return curves


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    text = write_jsonl(root / "text.jsonl",
                       [{"text": f"abc def {i} ghi {i * 7}"} for i in range(24)])
    qa = write_jsonl(root / "qa.jsonl", [{"prompt": f"{a}+{a}=", "completion": str(2 * a)}
                                         for a in range(4)])
    return {"model": make_checkpoint(root / "model"), "text": text, "qa": qa, "root": root}


def same_curve(curve: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps, and values equal up to TensorBoard's float32."""
    return ([s for s, _ in curve] == [s for s, _ in expected]
            and [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-6))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_distill_writes_loss_and_eval_metrics_at_their_steps(cli, files, tmp_path):
    out = tmp_path / "student"
    result = cli("distill", out, "--teacher", files["model"], "--student", "random",
                 "--data", files["text"], "--eval", f"r={files['qa']}", "--max-steps", "4",
                 "--eval-every", "2", "--log-every", "1", "--batch-size", "2",
                 "--max-length", "32", "--report-to", "tensorboard", "--run-name", "kd",
                 "--quiet")
    assert result.exit_code == 0, result.output
    curves = scalars(out / "runs" / "kd")
    log = _log(out)
    train = [e for e in log if e["type"] == "train"]
    evals = [e for e in log if e["type"] == "eval"]
    assert [s for s, _ in curves["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in curves["train/loss"]] == pytest.approx([e["loss"] for e in train],
                                                               rel=1e-6)
    assert [v for _, v in curves["train/lr"]] == pytest.approx([e["lr"] for e in train])
    assert [s for s, _ in curves["train/tokens_per_s"]] == [1, 2, 3, 4]
    assert "train/kd_loss" in curves  # the loss's own terms
    for metric in ("r.loss", "r.accuracy"):
        assert same_curve(curves[f"eval/{metric}"], [(e["step"], e[metric]) for e in evals])
    assert [e["step"] for e in evals] == [2, 4]
    # the run's settings, with undo.json's keys
    manifest = json.loads((out / "undo.json").read_text())
    hparams = next((out / "runs" / "kd").glob("*/hparams.yml")).read_text()
    assert "stage: distill" in hparams
    assert f"arguments.train.lr: {manifest['arguments']['train']['lr']}" in hparams


def test_relearn_attack_writes_every_run_and_the_worst_case(cli, files, tmp_path):
    out = tmp_path / "attack"
    result = cli("relearn-attack", files["model"], "--data", files["text"], "--eval",
                 f"forget={files['qa']}", "--out", out, "--lrs", "1e-3,3e-2", "--steps", "4",
                 "--eval-every", "2", "--batch-size", "2", "--max-length", "32", "--no-plot",
                 "--report-to", "tensorboard", "--quiet")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    curves = scalars(out / "runs" / "attack")
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        prefix = f"attack/{run['config']} seed {run['seed']}"
        for metric in ("forget.loss", "forget.accuracy"):
            assert same_curve(curves[f"{prefix}/eval/{metric}"],
                              [(p["step"], p[metric]) for p in run["curve"]])
        assert curves[f"{prefix}/train/loss"][-1][0] == 4
        assert curves[f"{prefix}/train/loss"][-1][1] == pytest.approx(run["train_loss"],
                                                                      rel=1e-6)
    metric = results["forget_metric"]
    assert same_curve(curves[f"worst/{metric}"],
                      [(p["step"], p["value"]) for p in results["worst_case"]])


@pytest.mark.parametrize("command", ["train", "distill", "relearn-attack", "unlearn"])
def test_a_missing_tracker_is_refused_before_any_work(cli, files, tmp_path, monkeypatch,
                                                     command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = {
        "train": ["train", out, "--init", files["model"], "--data", files["text"]],
        "distill": ["distill", out, "--teacher", files["model"], "--student", "random",
                    "--data", files["text"]],
        "relearn-attack": ["relearn-attack", files["model"], "--data", files["text"],
                           "--eval", f"f={files['qa']}", "--out", out],
        "unlearn": ["unlearn", files["model"], out, "--method", "maxent", "--forget",
                    files["text"]],
    }[command]
    result = cli(*args, "--report-to", "tensorboard", "--report-to", "wandb")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --report-to wandb: wandb is not installed")
    assert "pip install 'undo-cli[wandb]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []  # nothing written, not even a lock


def test_unknown_tracker_names_the_choices(cli, files, tmp_path):
    result = cli("train", tmp_path / "o", "--init", files["model"], "--data", files["text"],
                 "--report-to", "neptune")
    assert result.exit_code == 2
    assert "--report-to must be one of tensorboard, wandb, mlflow, trackio, none" in \
        result.stderr


def test_no_tracker_writes_no_runs_directory(cli, files, tmp_path):
    out = tmp_path / "plain"
    result = cli("train", out, "--init", files["model"], "--data", files["text"],
                 "--max-steps", "1", "--max-length", "32", "--batch-size", "2",
                 "--report-to", "none", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (out / "runs").exists()


def test_entries_become_tagged_curves():
    train = {"type": "train", "step": 3, "loss": 1.5, "kl": 0.5, "lr": 1e-3, "grad_norm": 2.0,
             "tokens_per_s": 10.0, "tokens": 30, "flops": 1e6, "elapsed_s": 4.0}
    assert entry_values(train) == {"train/loss": 1.5, "train/kl": 0.5, "train/lr": 1e-3,
                                   "train/grad_norm": 2.0, "train/tokens_per_s": 10.0,
                                   "train/tokens": 30.0, "train/flops": 1e6}
    ev = {"type": "eval", "step": 3, "tokens": 30, "flops": 1e6, "r.accuracy": 0.25}
    assert entry_values(ev, "attack/x/") == {"attack/x/eval/r.accuracy": 0.25}
    assert entry_values({"type": "diverged", "step": 3}) == {}


def test_settings_flatten_to_tracker_values():
    flat = flatten({"stage": "distill", "arguments": {"train": {"lr": 1e-3, "betas": [0.9, 0.99]},
                                                      "student": None, "resume": False},
                    "parents": {"teacher": Path("/m")}})
    assert flat == {"stage": "distill", "arguments.train.lr": 1e-3,
                    "arguments.train.betas": "[0.9, 0.99]", "arguments.student": "null",
                    "arguments.resume": False, "parents.teacher": "/m"}
