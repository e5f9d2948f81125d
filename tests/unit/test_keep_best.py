"""`--keep-best METRIC` (issue 29): the written model is the weights of the best evaluation
(the same as a `--save-every` state of that step), undo.json says which step and value, and
the best so far survives `--resume`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, write_jsonl
from safetensors.torch import load_file

from undo_cli.errors import UsageError
from undo_cli.gates import parse_objective
from undo_cli.options import DataOptions, EvalOptions, TrainConfig
from undo_cli.stage import Callbacks
from undo_cli.training import train_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_best")
    text = write_jsonl(root / "text.jsonl",
                       [{"text": f"abc def {i} ghi {i * 7}"} for i in range(24)])
    qa = write_jsonl(root / "qa.jsonl", [{"prompt": f"{a}+{a}=", "completion": str(2 * a)}
                                         for a in range(4)])
    return {"model": make_checkpoint(root / "model"), "text": text, "qa": qa}


class Interrupted(Exception):
    pass


def _run(files, out: Path, *, keep_best: str | None, stop_at: int | None = None,
         resume: bool = False, state_dir: Path | None = None) -> dict:
    """Train STEPS steps (an evaluation each step); `stop_at`: fail when step `stop_at`
    begins, leaving the --save-every state of the step before."""
    config = TrainConfig(lr=3e-3, max_steps=STEPS, eval_every=1, batch_size=2, seed=3,
                         keep_best=keep_best, save_every=1 if state_dir else None,
                         state_dir=state_dir, resume=resume)

    def on_step(step, total, tokens):  # noqa: ARG001
        if stop_at is not None and step == stop_at:
            raise Interrupted

    return train_checkpoint(out, str(files["model"]), [str(files["text"])], train=config,
                            data_options=DataOptions(max_length=32),
                            evals=EvalOptions(eval=[f"r={files['qa']}"]),
                            callbacks=Callbacks(on_step=on_step))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_the_best_step_is_written_and_equals_its_saved_state(files, tmp_path):
    # maximising the held-out loss picks an early step of a run that lowers it
    best_run = _run(files, tmp_path / "best", keep_best="max r.loss")
    manifest = json.loads((tmp_path / "best" / "undo.json").read_text())
    kept = manifest["keep_best"]
    log = [json.loads(line) for line in
           (tmp_path / "best" / "train_log.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["r.loss"] for e in log if e["type"] == "eval"}
    assert sorted(evals) == list(range(1, STEPS + 1))
    step = max(evals, key=lambda s: (evals[s], -s))  # first of the largest
    assert kept == {"metric": "max r.loss", "mode": "max", "step": step,
                    "value": evals[step]}
    assert step < STEPS, "the run must not peak at its last step for this test to mean much"
    assert manifest["metrics"]["r.loss"] == evals[step]  # the metrics of the written weights
    assert best_run["keep_best"]["step"] == step

    # the same run without --keep-best, interrupted after the state of step `step` was saved
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):
        _run(files, tmp_path / "plain", keep_best=None, stop_at=step + 1, state_dir=state_dir)
    saved = load_file(str(state_dir / f"step-{step:08d}" / "rank-0.safetensors"))
    written = _weights(tmp_path / "best")
    compared = 0
    for name, tensor in written.items():
        if f"model.{name}" in saved:
            assert torch.equal(tensor, saved[f"model.{name}"]), name
            compared += 1
    assert compared >= len(written) - 1  # all (a tied head is stored once)

    # and the last weights differ: --keep-best changed what was written
    _run(files, tmp_path / "last", keep_best=None)
    last = _weights(tmp_path / "last")
    assert any(not torch.equal(last[n], written[n]) for n in written)


def test_the_best_so_far_survives_a_resume(files, tmp_path):
    whole = _run(files, tmp_path / "whole", keep_best="max r.loss")
    step = whole["keep_best"]["step"]
    state_dir = tmp_path / "state"
    with pytest.raises(Interrupted):  # interrupted after the best step's evaluation
        _run(files, tmp_path / "resumed", keep_best="max r.loss", stop_at=step + 2,
             state_dir=state_dir)
    resumed = _run(files, tmp_path / "resumed", keep_best="max r.loss", resume=True,
                   state_dir=state_dir)
    assert resumed["resumed_from"] == step + 1
    assert resumed["keep_best"] == whole["keep_best"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_keep_best_with_stop_when_keeps_the_best_up_to_the_stop(cli, files, tmp_path):
    out = tmp_path / "student"
    result = cli("distill", out, "--teacher", files["model"], "--student", "random",
                 "--data", files["text"], "--eval", f"r={files['qa']}", "--max-steps", "20",
                 "--eval-every", "2", "--batch-size", "2", "--max-length", "32",
                 "--stop-when", "r.loss <= teacher * 2", "--keep-best", "min r.loss",
                 "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "undo.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["r.loss"] for e in log if e["type"] == "eval"}
    best = min(evals, key=lambda s: (evals[s], s))
    assert manifest["keep_best"]["step"] == best
    assert manifest["keep_best"]["value"] == evals[best]
    assert manifest["compute"]["steps"] == max(evals)


@pytest.mark.parametrize(("keep", "evals", "message"), [
    ("r.accuracy - r.loss", True, "say whether to maximise or minimise it"),
    ("r.loss < 2", True, "is a condition, not a number to maximise"),
    ("q.loss", True, "unknown"),
    ("r.loss", False, "--keep-best needs --eval sets"),
])
def test_bad_keep_best_is_refused_before_any_work(cli, files, tmp_path, keep, evals, message):
    work = tmp_path / "w"
    work.mkdir()
    result = cli("train", work / "out", "--init", files["model"], "--data", files["text"],
                 "--max-length", "32", *(["--eval", f"r={files['qa']}"] if evals else []),
                 "--keep-best", keep)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "--keep-best" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (work / "out").exists()


def test_objective_directions():
    values = {"r.accuracy": 0.5, "r.loss": 2.0, "f.accuracy": 0.25}
    assert parse_objective("r.accuracy").maximize
    assert not parse_objective("r.loss").maximize and not parse_objective("r.ppl").maximize
    both = parse_objective("max r.accuracy - f.accuracy")
    assert both.maximize and both.value(values) == 0.25
    low = parse_objective("min(r.loss + f.accuracy)")
    assert not low.maximize and low.value(values) == 2.25
    assert low.better(1.0, 2.0) and not low.better(2.0, 2.0)  # a tie keeps the earlier one
    assert not low.better(math.nan, None)
    with pytest.raises(UsageError, match="max of what"):
        parse_objective("max")


def test_train_config_resume_key_holds_keep_best():
    from undo_cli.engine.state import resume_key

    a = resume_key(TrainConfig(max_steps=1), {}, 1)
    b = resume_key(replace(TrainConfig(max_steps=1), keep_best="r.loss"), {}, 1)
    assert a != b


def test_unlearn_keeps_the_best_evaluation(cli, files, tmp_path):
    out = tmp_path / "unlearned"
    result = cli("unlearn", files["model"], out, "--method", "maxent", "--forget",
                 files["text"], "--eval", f"f={files['qa']}", "--max-steps", "4",
                 "--eval-every", "1", "--batch-size", "2", "--max-length", "32",
                 "--keep-best", "min f.loss", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "undo.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["f.loss"] for e in log if e["type"] == "eval"}
    best = min(evals, key=lambda s: (evals[s], s))
    assert manifest["keep_best"] == {"metric": "min f.loss", "mode": "min", "step": best,
                                     "value": evals[best]}
    assert manifest["arguments"]["train"]["keep_best"] == "min f.loss"
