"""Training states without pickle (issue 19): what a state directory holds, that resuming
unpickles nothing and stays bit-exact, and that undo touches only the states it wrote."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_engine import Interrupt, assert_identical, config, files, make_model, streams, weights

from undo_cli.engine import latest_state, lm_loss, remove_state, train
from undo_cli.engine.state import check_state_dir, clear_states
from undo_cli.engine.state_files import allowed_files, check_files, is_ours
from undo_cli.errors import UsageError

__all__ = ["files"]  # the module fixture of test_engine, shared


def _interrupted(tok, files, cfg, at: int) -> None:
    def stop(model, step):
        if step == at:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        train(make_model(tok, "gpt2"), lm_loss(), streams(tok, files),
              replace(cfg, eval_every=1), evaluate=stop)


def test_a_state_is_safetensors_and_json_and_resuming_unpickles_nothing(tok, files, tmp_path,
                                                                        monkeypatch):
    cfg = config(max_steps=8, save_every=4, state_dir=tmp_path / "state", weight_decay=0.1)
    model = make_model(tok, "gpt2")  # dropout: the random generators must be restored too
    train(model, lm_loss(), streams(tok, files), replace(cfg, save_every=None))
    expected = weights(model)
    _interrupted(tok, files, cfg, at=5)
    saved = latest_state(cfg.state_dir)
    assert saved.name == "step-00000004" and is_ours(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted(allowed_files(1))
    doc = json.loads((saved / "rank-0.json").read_text())  # plain JSON
    assert set(doc) == {"run", "rng", "model", "optimizer"}
    tensors = load_file(saved / "rank-0.safetensors")
    assert any(k.startswith("optim.state.") for k in tensors)
    assert "rng.torch" in tensors

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    model = make_model(tok, "gpt2", seed=3)
    resumed = train(model, lm_loss(), streams(tok, files), replace(cfg, resume=True))
    assert resumed.resumed_from == 4
    assert_identical(weights(model), expected)


def test_anything_else_in_a_state_is_refused_before_it_is_read(tok, files, tmp_path):
    cfg = config(max_steps=4, save_every=2, state_dir=tmp_path / "state")
    _interrupted(tok, files, cfg, at=3)
    saved = latest_state(cfg.state_dir)
    check_files(saved, world=1)
    planted = saved / "custom_checkpoint_0.pkl"
    planted.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UsageError, match="it holds custom_checkpoint_0.pkl, which undo does "
                                         "not write"):
        train(make_model(tok, "gpt2"), lm_loss(), streams(tok, files),
              replace(cfg, resume=True))
    planted.unlink()
    (saved / "rank-1.json").write_text("{}")  # a process this run does not have
    with pytest.raises(UsageError, match="rank-1.json"):
        check_files(saved, world=1)


def test_only_states_carrying_undos_marker_are_removed(tok, files, tmp_path):
    """The user's entries in --state-dir, even named like undo's, are never deleted."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".tmp-notes").mkdir()
    (state_dir / "step-final.txt").write_text("mine")
    (state_dir / "step-notes").mkdir()
    cfg = config(max_steps=4, save_every=2, state_dir=state_dir)
    train(make_model(tok), lm_loss(), streams(tok, files), cfg)
    assert sorted(p.name for p in state_dir.iterdir()) == [
        ".tmp-notes", "step-00000002", "step-final.txt", "step-notes"]
    remove_state(state_dir)
    assert sorted(p.name for p in state_dir.iterdir()) == [
        ".tmp-notes", "step-final.txt", "step-notes"]
    # A directory named exactly like undo's states but not written by it: refused up front
    # (never loaded, never deleted).
    foreign = state_dir / "step-00000002"
    foreign.mkdir()
    (foreign / "complete.json").write_text("{}")
    with pytest.raises(UsageError, match="holds step-00000002, which this version of undo "
                                         "did not write"):
        check_state_dir(state_dir)
    clear_states(state_dir)
    assert foreign.is_dir()


def test_a_save_killed_before_its_marker_is_ours_and_cleared(tmp_path):
    """kill -9 between creating `.tmp-step-N` and writing its marker leaves an empty directory
    (or an unfinished marker): undo's own, holding nothing, so resuming clears it instead of
    refusing the state directory. Anything more in it is still refused."""
    from undo_cli.engine.state_files import MARKER

    empty = tmp_path / ".tmp-step-00000014"
    empty.mkdir()
    half = tmp_path / ".tmp-step-00000016"
    half.mkdir()
    (half / MARKER).write_text('{"undo": "undo-tra')
    assert is_ours(empty) and is_ours(half)
    check_state_dir(tmp_path)
    assert latest_state(tmp_path) is None
    clear_states(tmp_path)
    assert not empty.exists() and not half.exists()

    foreign = tmp_path / ".tmp-step-00000018"
    foreign.mkdir()
    (foreign / "state.pkl").write_bytes(pickle.dumps({"step": 18}))
    assert not is_ours(foreign)
    assert not is_ours(tmp_path / "step-00000020")  # absent
    (tmp_path / "step-00000020").mkdir()
    assert not is_ours(tmp_path / "step-00000020")  # empty, but not an interrupted save
    with pytest.raises(UsageError, match="did not write"):
        check_state_dir(tmp_path)
