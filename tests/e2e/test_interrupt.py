"""Ctrl-C (SIGINT) and SIGTERM during `train` and `unlearn` (issue 19, point 15).

The contract: a signal that arrives before OUT is complete exits 130 and leaves no OUT (and
no temporary directory or lock beside it); one that arrives after OUT was renamed into place
loses nothing, says so, and exits 0 (the commit itself is never cut: signals wait for it).
Each case makes the moment of the signal certain:

- mid-training: the signal comes while the run trains (its training state is being saved
  every step);
- just before the commit: the output is fully written in its temporary directory;
- just after the commit: OUT is in place and the run is in the clean-up that follows.

In `undo` subprocesses (the console entry point and its signal handlers, a signal at a
seeded random moment of training): `train` by default, every case with `-m slow`. In
process (the command sends the signal to its own main thread at the moment, through the
handlers Python installs; it is handled before the sending call returns, so nothing waits):
every command and moment, fast.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_checkpoint

TEXT = [f"{a} + {b} = {a + b}" for a in range(15) for b in range(6)]
FAST = ["--max-length", "32", "--batch-size", "2", "--device", "cpu", "-q"]

# `undo` with a hook: UNDO_TEST_PAUSE=before|after makes the run write UNDO_TEST_MARKER and
# wait just before OUT is renamed into place, or just after (in the state clean-up).
RUNNER = """
import os, time
pause, marker = os.environ.get("UNDO_TEST_PAUSE"), os.environ.get("UNDO_TEST_MARKER")

def wait():
    open(marker, "w").close()
    time.sleep(120)

if pause == "before":
    import undo_cli.checkpoint.output as output
    real_commit = output._commit
    def commit(*args, **kwargs):
        wait()
        real_commit(*args, **kwargs)
    output._commit = commit
elif pause == "after":
    import undo_cli.engine.state as state
    real_remove = state.remove_state
    def remove(*args, **kwargs):
        wait()
        real_remove(*args, **kwargs)
    state.remove_state = remove
from undo_cli.cli import main
main()
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("interrupt")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return {"ckpt": make_checkpoint(d / "ckpt"), "text": d / "text.jsonl"}


def _command(name: str, out: Path, inputs: dict, steps: int) -> list[str]:
    if name == "train":
        return ["train", str(out), "--init", "tiny", "--data", str(inputs["text"]),
                "--max-steps", str(steps), *FAST]
    return ["unlearn", str(inputs["ckpt"]), str(out), "--method", "graddiff", "--forget",
            str(inputs["text"]), "--retain", str(inputs["text"]), "--max-steps", str(steps),
            *FAST]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _run(name: str, moment: str, sig: int, work: Path, inputs: dict, seed: int) -> dict:
    out, marker = work / "out", work / "marker"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", UNDO_TEST_MARKER=str(marker))
    args = _command(name, out, inputs, steps=400 if moment == "training" else 3)
    if moment == "training":
        args += ["--save-every", "1"]
    else:
        env["UNDO_TEST_PAUSE"] = moment
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    if moment == "training":
        _wait_for(work / "out.undo-state", proc)  # the first state is being saved
        time.sleep(random.Random(seed).uniform(0.0, 0.5))
    else:
        _wait_for(marker, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    beside = sorted(p.name for p in work.iterdir() if p.name not in ("marker",))
    return {"code": proc.returncode, "stderr": stderr, "out": out.exists(), "beside": beside,
            "complete": (out / "undo.json").is_file() and (out / "model.safetensors").is_file()}


CASES = [("train", "training", signal.SIGINT), ("unlearn", "training", signal.SIGINT),
         ("train", "before", signal.SIGINT), ("unlearn", "before", signal.SIGTERM),
         ("train", "after", signal.SIGINT), ("unlearn", "after", signal.SIGINT)]


def _check(result: dict, moment: str) -> None:
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    if moment == "after":  # the signal came after the final save: OUT is complete
        assert result["code"] == 0, result
        assert result["out"] and result["complete"], result
        assert len(lines) == 1 and lines[0].startswith("note: interrupted after "), result
        assert lines[0].endswith("/out was written (it is complete)"), result
        assert result["beside"] == ["out"], result
        return
    assert result["code"] == 130, result
    assert lines == ["error: interrupted; nothing was written"], result
    assert not result["out"], result
    # No OUT, no temporary directory, no lock; only the training state (for --resume).
    assert result["beside"] in ([], ["out.undo-state"]), result


def _ids(cases):
    return [f"{n}-{m}-{signal.Signals(s).name}" for n, m, s in cases]


def _sigint_to_this_thread() -> None:
    """SIGINT sent to the calling (main) thread: delivered to it before `pthread_kill`
    returns, which then runs Python's handler (KeyboardInterrupt raised right here).

    `os.kill(os.getpid(), SIGINT)` queued a process-wide signal that any thread of the
    process (torch's and OpenMP's workers) may take; the handler then ran whenever that
    thread was next scheduled, and the test's 5-second sleep stood in for synchronisation:
    on a loaded machine the run went on and finished (exit 0, issue 26 item 16)."""
    assert threading.current_thread() is threading.main_thread()
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    raise AssertionError("SIGINT sent to this thread did not interrupt it")


@pytest.fixture()
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) while the test runs, whatever the test
    process inherited: a process started in the background by a non-interactive shell (`cmd &`,
    nohup, some CI runners) begins with SIGINT ignored, and Python then leaves it ignored, so
    the signal these tests send would never arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_while_training_in_a_subprocess(inputs, tmp_path):
    _check(_run("train", "training", signal.SIGINT, tmp_path, inputs, seed=1), "training")


@pytest.mark.slow
@pytest.mark.parametrize("name,moment,sig", CASES[1:], ids=_ids(CASES[1:]))
def test_every_moment_in_a_subprocess(inputs, tmp_path, name, moment, sig):
    _check(_run(name, moment, sig, tmp_path, inputs, seed=7), moment)


@pytest.mark.parametrize("name,moment", [(n, m) for n, m, _ in CASES],
                         ids=[f"{n}-{m}" for n, m, _ in CASES])
def test_every_moment_in_process(cli, inputs, tmp_path, monkeypatch, name, moment,
                                 python_sigint_handler):
    """The same moments, the signal sent by the command to itself (SIGINT: Python's own
    handler raises KeyboardInterrupt where the command is)."""
    import undo_cli.checkpoint.output as output
    import undo_cli.engine.loop as loop
    import undo_cli.engine.state as state

    interrupt = _sigint_to_this_thread
    args = _command(name, tmp_path / "out", inputs, steps=6)
    if moment == "training":
        real_save = loop.save_state

        def save_then_signal(accelerator, state_dir, step, *rest, **parts):
            real_save(accelerator, state_dir, step, *rest, **parts)
            if step == 3:
                interrupt()

        monkeypatch.setattr(loop, "save_state", save_then_signal)
        args += ["--save-every", "1"]
    else:
        hooked = (output, "_commit") if moment == "before" else (state, "remove_state")
        real = getattr(*hooked)

        def signal_then(*a, **k):
            interrupt()
            return real(*a, **k)

        monkeypatch.setattr(*hooked, signal_then)
    result = cli(*args)
    out = tmp_path / "out"
    _check({"code": result.exit_code, "stderr": result.stderr, "out": out.exists(),
            "complete": (out / "undo.json").is_file(),
            "beside": sorted(p.name for p in tmp_path.iterdir())}, moment)


def test_a_late_interrupt_of_a_gated_attack_is_not_a_success(cli, inputs, tmp_path,
                                                             monkeypatch,
                                                             python_sigint_handler):
    """relearn-attack checks its --fail-if gates after writing RESULTS_DIR: interrupted
    between the two, it exits 130 (the gates were not checked), its output complete."""
    import undo_cli.engine as engine

    monkeypatch.setattr(engine, "wait_for_everyone", _sigint_to_this_thread)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a} + 1 =", "completion": f" {a + 1}"})
                             + "\n" for a in range(8)))
    out = tmp_path / "results"
    result = cli("relearn-attack", inputs["ckpt"], "--data", pairs, "--eval",
                 f"forget={pairs}", "--steps", "1", "--lrs", "1e-3", "--max-length", "32",
                 "--fail-if", "worst.forget.loss > 0", "--no-plot", "--out", out)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().endswith("its --fail-if gates were not checked")
    assert (out / "results.json").is_file()
