"""Training states without pickle (issue 19): what a state directory holds, that resuming
unpickles nothing and stays bit-exact, and that undo touches only the states it wrote."""

from __future__ import annotations

import json
import pickle
import shutil
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
    (foreign / "notes.txt").write_text("mine")  # a file undo never writes into a state
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
    with pytest.raises(UsageError, match="did not write"):
        check_state_dir(tmp_path)


def _saved_state(tok, files, tmp_path):
    """(config, the state directory of a run interrupted after saving step 4)."""
    cfg = config(max_steps=8, save_every=4, state_dir=tmp_path / "state", weight_decay=0.1)
    _interrupted(tok, files, cfg, at=5)
    return cfg, latest_state(cfg.state_dir)


def test_a_removal_killed_at_any_moment_leaves_a_state_undo_accepts(tok, files, tmp_path,
                                                                     monkeypatch):
    """kill -9 while an older state is removed (issue 26): whatever is left of it is undo's
    own, never resumed, and cleared by the next run, resumed or fresh."""
    from pathlib import Path

    from undo_cli.engine.state_files import remove_state_dir

    cfg, saved = _saved_state(tok, files, tmp_path)
    entries = len(list(saved.iterdir()))
    real = {"unlink": Path.unlink, "rmdir": Path.rmdir}
    for kill_after in range(entries + 1):  # before each file's removal, and the directory's
        victim = cfg.state_dir / "step-00000002"
        shutil.copytree(saved, victim)
        calls = []

        def killer(name, calls=calls, kill_after=kill_after):
            def call(self, *args, **kwargs):
                if len(calls) == kill_after:
                    raise Interrupt  # the kill
                calls.append(self.name)
                return real[name](self, *args, **kwargs)
            return call

        for name in real:
            monkeypatch.setattr(Path, name, killer(name))
        with pytest.raises(Interrupt):
            remove_state_dir(victim)
        for name in real:
            monkeypatch.setattr(Path, name, real[name])
        assert kill_after == 0 or calls[0] == "complete.json"  # no longer resumable first
        assert is_ours(victim), sorted(p.name for p in victim.iterdir())
        check_state_dir(cfg.state_dir)  # neither --resume nor a fresh run refuses it
        assert latest_state(cfg.state_dir) == saved  # the intact newer state is resumed
        clear_states(cfg.state_dir, keep=saved)
        assert not victim.exists()
    # What the removal of earlier versions left (rmtree, in any order): marker-less step-N
    # directories holding some of undo's files, or none.
    left = cfg.state_dir / "step-00000006"
    shutil.copytree(saved, left)
    (left / "undo-state.json").unlink()
    (left / "rank-0.safetensors").unlink()
    (cfg.state_dir / "step-00000007").mkdir()
    check_state_dir(cfg.state_dir)
    assert latest_state(cfg.state_dir) == saved  # never one without its marker
    model = make_model(tok, "gpt2", seed=3)
    resumed = train(model, lm_loss(), streams(tok, files), replace(cfg, resume=True,
                                                                   save_every=None))
    assert resumed.resumed_from == 4
    train(make_model(tok, "gpt2"), lm_loss(), streams(tok, files), cfg)  # a fresh run
    assert not left.exists() and not (cfg.state_dir / "step-00000007").exists()


def _rewrite(state, rank_json=None, tensors=None, rehash=True):
    """Change rank 0's files of `state` (and, with `rehash`, complete.json's fingerprints, as
    a consistent rewrite would)."""
    from safetensors.torch import save_file

    from undo_cli.engine.state_files import file_hashes

    if rank_json is not None:
        doc = json.loads((state / "rank-0.json").read_text())
        rank_json(doc)
        (state / "rank-0.json").write_text(json.dumps(doc))
    if tensors is not None:
        stored = load_file(state / "rank-0.safetensors")
        tensors(stored)
        save_file(stored, state / "rank-0.safetensors", metadata={"format": "pt"})
    if rehash:
        complete = json.loads((state / "complete.json").read_text())
        complete["files"] = file_hashes(state)
        (state / "complete.json").write_text(json.dumps(complete))


def _first(stored, prefix, ndim=1):
    return next(k for k, v in sorted(stored.items()) if k.startswith(prefix)
                and v.ndim == ndim and v.is_floating_point())


def _set_json(name, key, value):
    def change(doc_or_file):
        doc_or_file[key] = value
    return change


@pytest.mark.parametrize("case", [
    "model-shape", "model-int", "optimizer-shape", "optimizer-int", "optimizer-step",
    "run-step", "marker-step", "complete-step", "changed-file", "no-fingerprints"])
def test_resume_refuses_a_state_that_is_not_what_was_saved(tok, files, tmp_path, case):
    """--resume checks the saved state as model loading checks a checkpoint (issue 26): every
    tensor's shape and dtype, the step counters against each other, and every rank file
    against the fingerprint complete.json records; a mismatch is refused naming the file."""
    cfg, saved = _saved_state(tok, files, tmp_path)
    stored = load_file(saved / "rank-0.safetensors")
    model_name = _first(stored, "model.")
    optim_name = _first(stored, "optim.state.")
    step_name = next(k for k in stored if k.startswith("optim.state.") and k.endswith(".step"))
    file, message = "rank-0.safetensors", None

    def put(name, value):
        return lambda t: t.update({name: value})

    if case == "model-shape":  # broadcast by copy_ before
        _rewrite(saved, tensors=put(model_name, stored[model_name][:1].clone()))
        message = f"tensor '{model_name[len('model.'):]}' has shape [1], the run needs"
    elif case == "model-int":  # cast by copy_ before
        _rewrite(saved, tensors=put(model_name, stored[model_name].to(torch.int32)))
        message = "is stored as int32, the run needs float32"
    elif case == "optimizer-shape":
        _rewrite(saved, tensors=put(optim_name, stored[optim_name][:1].clone()))
        message = "has shape [1], the run needs"
    elif case == "optimizer-int":
        _rewrite(saved, tensors=put(optim_name, stored[optim_name].to(torch.int64)))
        message = "is stored as int64, the run needs float32"
    elif case == "optimizer-step":
        _rewrite(saved, tensors=put(step_name, torch.tensor(1000.0)))
        message = "is not a step count of at most the run's step 4"
    elif case == "run-step":
        _rewrite(saved, rank_json=lambda doc: doc["run"].update(step=2))
        file, message = "rank-0.json", "the run's step 2 is not the state's step 4"
    elif case in ("marker-step", "complete-step"):
        name = "undo-state.json" if case == "marker-step" else "complete.json"
        data = json.loads((saved / name).read_text())
        (saved / name).write_text(json.dumps(dict(data, step=6)))
        file, message = name, "it says step 6, the directory is step 4"
    elif case == "changed-file":
        _rewrite(saved, tensors=put(model_name, stored[model_name] * 2), rehash=False)
        message = "the file changed after it was saved"
    else:
        data = json.loads((saved / "complete.json").read_text())
        del data["files"]
        (saved / "complete.json").write_text(json.dumps(data))
        file, message = "complete.json", "records no fingerprints"
    model = make_model(tok, "gpt2", seed=3)
    before = weights(model)
    with pytest.raises(UsageError, match="cannot resume from ") as e:
        train(model, lm_loss(), streams(tok, files), replace(cfg, resume=True))
    assert f"{saved / file}" in str(e.value) and message in str(e.value), str(e.value)
    assert_identical(weights(model), before)  # refused before anything was loaded


def test_a_state_saved_before_bf16_weights_existed_resumes_as_fp32(tmp_path):
    """States written before `--bf16-weights` have no such key: read as False (so a resume
    with the default settings is not refused), and True still differs."""
    from undo_cli.engine.state import resume_key, saved_key
    from undo_cli.engine.state_files import COMPLETE

    key = resume_key(config(), {"train": None}, 1)
    old = {k: v for k, v in key.items() if k != "bf16_weights"}
    (tmp_path / COMPLETE).write_text(json.dumps({"config": old}))
    assert saved_key(tmp_path) == json.loads(json.dumps(key))
    assert resume_key(config(bf16_weights=True), {"train": None}, 1)["bf16_weights"] is True
