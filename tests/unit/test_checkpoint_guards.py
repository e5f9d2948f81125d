"""The checkpoint package's guards (issue 19): the loading report, the model-size estimate,
OUT's lock, the atomic swap of --overwrite and the clean-up of dead runs' temporaries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from undo_cli.checkpoint import atomic_output, check_output_path, load_model
from undo_cli.checkpoint.inspection import estimate_parameters, inspect_checkpoint
from undo_cli.checkpoint.load import RECOMPUTED, check_loading_report, recomputed
from undo_cli.checkpoint.lock import command_scope, hold_output, lock_file, output_lock
from undo_cli.checkpoint.output import remove_stale_temporaries
from undo_cli.checkpoint.swap import exchange
from undo_cli.errors import UsageError

# ---------------------------------------------------------------- the loading report


def _copy_without(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    del state[name]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_every_load_checks_the_report(tiny_llama, tmp_path):
    """transformers fills a missing tensor with random values and only warns; undo refuses,
    naming the tensor and the file."""
    broken = _copy_without(tiny_llama, tmp_path / "broken", "model.norm.weight")
    with pytest.raises(UsageError, match="'model.norm.weight' is missing from "
                                         "model.safetensors"):
        load_model(broken)


def test_a_tied_head_is_recomputed_not_missing(tiny_gpt2):
    """GPT-2 ties lm_head to the token embedding: its file holds no lm_head.weight, and that
    is no error (the tensors an architecture recomputes are listed explicitly)."""
    assert "lm_head.weight" not in load_file(tiny_gpt2 / "model.safetensors")
    model = load_model(tiny_gpt2)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert recomputed("lm_head.weight", tied=True) and not recomputed("lm_head.weight", False)
    assert recomputed("model.layers.0.self_attn.rotary_emb.inv_freq", tied=False)
    assert recomputed("transformer.h.0.attn.bias", tied=False)
    assert not recomputed("transformer.h.0.attn.c_attn.bias", tied=False)
    assert len(RECOMPUTED) == 3


def test_the_report_names_each_kind_of_problem(tiny_llama):
    info = inspect_checkpoint(tiny_llama)
    model = load_model(tiny_llama)
    ok = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    check_loading_report(info, model, ok)
    for report, message in (
            ({"missing_keys": {"model.norm.weight"}}, "is missing from model.safetensors"),
            ({"unexpected_keys": {"model.extra"}}, "'model.extra' in model.safetensors has "
                                                   "no place in the LlamaForCausalLM"),
            ({"mismatched_keys": {("model.norm.weight", torch.Size([5]), torch.Size([32]))}},
             "has shape [5], the model needs [32]"),
            ({"missing_keys": {"a.weight", "b.weight"}}, "(and 1 more)")):
        with pytest.raises(UsageError, match=re.escape(message)):
            check_loading_report(info, model, {**ok, **report})
    # Recomputed buffers listed as missing are fine.
    check_loading_report(info, model, {**ok, "missing_keys": {
        "model.layers.0.self_attn.rotary_emb.inv_freq"}})


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tiny_llama, tmp_path,
                                                              monkeypatch):
    config = json.loads((tiny_llama / "config.json").read_text())
    params = estimate_parameters(config)
    actual = sum(p.numel() for p in load_model(tiny_llama).parameters())
    assert params is not None and params <= actual  # a lower bound
    assert params >= actual // 2
    monkeypatch.setenv("UNDO_MEMORY_LIMIT", str(params))  # less than 4 bytes a parameter
    with pytest.raises(UsageError, match=r"needs at least .* GB \(\d[\d,]* parameters "
                                         r"estimated from its config, 4 bytes each\)"):
        load_model(tiny_llama)
    monkeypatch.setenv("UNDO_MEMORY_LIMIT", str(10 * params))
    load_model(tiny_llama)


def test_a_learned_position_table_counts_in_the_estimate(tiny_gpt2):
    # GPT-2's positions are a table of n_positions x hidden: `init --arch gpt2
    # --max-position 100000000000` died in the allocator instead of this check.
    config = json.loads((tiny_gpt2 / "config.json").read_text())
    actual = sum(p.numel() for p in load_model(tiny_gpt2).parameters())
    params = estimate_parameters(config)
    assert params <= actual
    assert params - estimate_parameters({**config, "n_positions": 0}) == (
        config["n_positions"] * config["n_embd"])


def test_shards_in_subdirectories_are_told_apart(tiny_llama, tmp_path):
    """Two shards may share a file name in different subdirectories."""
    state = load_file(tiny_llama / "model.safetensors")
    ckpt = shutil.copytree(tiny_llama, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for sub, part in (("a", names[:half]), ("b", names[half:])):
        (ckpt / sub).mkdir()
        save_file({n: state[n] for n in part}, ckpt / sub / "model.safetensors",
                  metadata={"format": "pt"})
        weight_map.update({n: f"{sub}/model.safetensors" for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    info = inspect_checkpoint(ckpt)
    assert len(info.weight_files) == 2 and set(info.tensors) == set(state)
    assert info.file_of(names[-1]) == "b/model.safetensors"
    from undo_cli.checkpoint import fingerprint

    before = fingerprint(ckpt)
    part = load_file(ckpt / "b" / "model.safetensors")
    part[names[-1]] = part[names[-1]] + 1
    save_file(part, ckpt / "b" / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(ckpt) != before  # the shard in b/ is part of the content


# ---------------------------------------------------------------- OUT's lock


_HOLD = """
import sys, time
from undo_cli.checkpoint.lock import output_lock
with output_lock(sys.argv[1]):
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.fixture()
def held(tmp_path):
    """Another process holding the lock of tmp_path/out."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_run_to_the_same_output_is_refused_naming_the_holder(held):
    out, proc = held
    message = f"being written by another undo run \\(pid {proc.pid} on "
    with pytest.raises(UsageError, match=message), atomic_output(out):
        pass
    with command_scope(), pytest.raises(UsageError, match=f"pid {proc.pid}"):
        check_output_path(out)
    assert not out.exists()


def test_the_lock_is_released_when_its_holder_dies(held):
    out, proc = held
    proc.kill()
    proc.wait()
    assert lock_file(out).exists()  # left by kill -9, but nobody holds it
    with atomic_output(out) as tmp:
        (tmp / "x").write_text("x")
    assert (out / "x").exists() and not lock_file(out).exists()


def test_the_lock_lasts_the_whole_command_and_is_reentrant(tmp_path):
    out = tmp_path / "deep" / "out"
    with command_scope():
        hold_output(out)  # e.g. check_output_path, before the model is even loaded
        assert lock_file(out).exists()
        with output_lock(out), atomic_output(out) as tmp:  # the same run: re-entrant
            (tmp / "x").write_text("x")
        assert lock_file(out).exists()
    assert not lock_file(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with command_scope():  # a failed command removes the directories it made for the lock
        hold_output(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- --overwrite


def test_overwrite_is_one_atomic_exchange(tmp_path, monkeypatch):
    import undo_cli.checkpoint.output as output

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    assert exchange(a, b)  # this Linux has renameat2(RENAME_EXCHANGE)
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    renames = []
    monkeypatch.setattr(output.os, "replace", lambda *a: renames.append(a))
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert renames == []  # no rename: the swap was one exchange
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_without_exchange_two_renames_and_an_interrupted_swap_is_undone(tmp_path,
                                                                        monkeypatch, caplog):
    import undo_cli.checkpoint.output as output

    monkeypatch.setattr(output, "exchange", lambda a, b: False)  # e.g. not Linux
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A run killed between the two renames: OUT is gone, the old output is hidden.
    hidden = tmp_path / ".out.undo-old-999999999-abcd"
    os.replace(out, hidden)
    with caplog.at_level("INFO", logger="undo_cli"):
        remove_stale_temporaries(out)
    assert (out / "new").exists() and not hidden.exists()
    assert "put back" in caplog.text and "pid 999999999" in caplog.text


def test_stale_temporaries_are_removed_with_a_note(tmp_path, caplog):
    stale = tmp_path / ".out.undo-tmp-999999999-abcd"
    stale.mkdir()
    alive = tmp_path / f".out.undo-tmp-{os.getppid()}-abcd"  # a live process's
    alive.mkdir()
    with caplog.at_level("INFO", logger="undo_cli"), atomic_output(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and alive.exists()
    assert "removed .out.undo-tmp-999999999-abcd, left by an interrupted run (pid 999999999 " \
           "is gone)" in caplog.text


def test_a_symlinked_output_is_replaced_through_its_link(tmp_path):
    target = tmp_path / "run-3"
    target.mkdir()
    (target / "old").write_text("old")
    link = tmp_path / "latest"
    link.symlink_to(target)
    with atomic_output(link, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-3"]  # no stray link


def test_output_names_leave_room_for_undos_siblings(tmp_path):
    with pytest.raises(UsageError, match="too long"):
        check_output_path(tmp_path / ("x" * 240))
    check_output_path(tmp_path / ("x" * 200))


def test_paths_read_inside_the_output_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="--data .* lies inside the output"):
        check_output_path(out, reads=[("--data", out / "data.jsonl")], overwrite=True)
    with pytest.raises(UsageError, match="--state-dir"):
        check_output_path(out, reads=[("--state-dir", out)], overwrite=True)
    check_output_path(out, reads=[("--data", tmp_path / "elsewhere.jsonl")], overwrite=True)
