"""A full disk while writing: a clear one-line error (exit 1), no output directory, no
temporary or half-written state left, inputs untouched.

The disk is filled in two ways:

- patched writers, in-process (always run): the disk "fills" in the middle of a weights file
  (perturb's streaming writer; transformers' safetensors writer, which reports it as a
  `SafetensorError`), while writing undo.json, and while saving the training state;
- a real 64 KiB tmpfs mounted in a private mount namespace (`unshare -rm`; skipped where
  that is not allowed): `undo perturb` and `undo train` into it.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint

TEXT = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(5)]
FAST = ["--max-length", "32", "--batch-size", "2", "--max-steps", "4", "-q", "--device", "cpu"]
MESSAGE = "no space left on the device"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("disk-full-inputs")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return {"dir": d, "ckpt": make_checkpoint(d / "ckpt"), "text": d / "text.jsonl"}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _check(result, work: Path, inputs: dict[str, Path], before: dict) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and MESSAGE in lines[0], lines
    assert "nothing was written" in lines[0] and "Traceback" not in result.output
    assert list(work.iterdir()) == [], sorted(p.name for p in work.iterdir())
    assert _snapshot(inputs["dir"]) == before  # inputs byte-identical


def test_perturb_disk_full_in_the_middle_of_a_weights_file(cli, inputs, tmp_path,
                                                          monkeypatch):
    from undo_cli.checkpoint.safetensors_io import SafetensorsWriter

    real = SafetensorsWriter._write_all
    calls = []

    def fill_up(self, view):
        calls.append(len(view))
        if len(calls) == 3:  # the header and one tensor went through; half of the next
            real(self, view[: len(view) // 2])
            raise _full_disk()
        real(self, view)

    monkeypatch.setattr(SafetensorsWriter, "_write_all", fill_up)
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(inputs["dir"])
    result = cli("perturb", inputs["ckpt"], work / "out")
    assert len(calls) == 3
    _check(result, work, inputs, before)


def test_train_disk_full_while_transformers_writes_the_weights(cli, inputs, tmp_path,
                                                               monkeypatch):
    """safetensors' own writer reports ENOSPC as a SafetensorError "... (os error 28)"."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def fill_up(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial file
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fill_up)
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(inputs["dir"])
    result = cli("train", work / "out", "--init", inputs["ckpt"], "--data", inputs["text"], *FAST)
    _check(result, work, inputs, before)


def test_unlearn_disk_full_while_writing_the_manifest(cli, inputs, tmp_path, monkeypatch):
    import undo_cli.checkpoint as checkpoint

    def fill_up(directory, manifest):
        (Path(directory) / "undo.json").write_text('{"stage": "unl')  # a partial file
        raise _full_disk()

    monkeypatch.setattr(checkpoint, "write_manifest", fill_up)
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(inputs["dir"])
    result = cli("unlearn", inputs["ckpt"], work / "out", "--method", "ga", "--forget",
                 inputs["text"], *FAST)
    _check(result, work, inputs, before)


def test_distill_disk_full_while_saving_the_training_state(cli, inputs, tmp_path,
                                                           monkeypatch):
    """The first state save fails half-way: no state directory is left either."""
    import undo_cli.engine.state as state

    def fill_up(directory, rank, **kwargs):
        (Path(directory) / f"rank-{rank}.safetensors").write_bytes(b"\0" * 1000)
        raise _full_disk()

    monkeypatch.setattr(state, "save_rank", fill_up)
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(inputs["dir"])
    result = cli("distill", work / "out", "--teacher", inputs["ckpt"], "--student", "random",
                 "--data", inputs["text"], "--save-every", "2", *FAST)
    _check(result, work, inputs, before)  # also: no out.undo-state


def _private_tmpfs_works(mountpoint: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"mount -t tmpfs -o size=64k tmpfs '{mountpoint}'"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


def test_a_real_full_tmpfs(inputs, tmp_path):
    """A 64 KiB tmpfs: smaller than the 100 KB weights of the tiny model."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if not _private_tmpfs_works(mnt):
        pytest.skip("cannot mount a private tmpfs here (unshare -rm + mount not allowed)")
    before = _snapshot(inputs["dir"])
    undo = f"'{sys.executable}' -m undo_cli"
    script = (
        f"mount -t tmpfs -o size=64k tmpfs '{mnt}' || exit 99\n"
        f"{undo} perturb '{inputs['ckpt']}' '{mnt}/perturbed'; echo \"perturb=$?\"\n"
        f"{undo} train '{mnt}/trained' --init '{inputs['ckpt']}' --data '{inputs['text']}' "
        f"{' '.join(FAST)}; echo \"train=$?\"\n"
        f"echo \"left=$(ls -A '{mnt}' | tr '\\n' ' ')\"\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HOME": str(tmp_path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    report = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert report == {"perturb": "1", "train": "1", "left": ""}, (done.stdout, done.stderr)
    errors = done.stderr.strip().splitlines()
    assert errors == [f"error: {MESSAGE} while writing {mnt}/perturbed; nothing was written",
                      f"error: {MESSAGE} while writing {mnt}/trained; nothing was written"]
    assert _snapshot(inputs["dir"]) == before
