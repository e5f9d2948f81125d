"""kill -9 during train, unlearn and distill: never a half-written output, and `--resume`
finishes with the same weights as an uninterrupted run, bit for bit (CPU, same seed).

For each command, in a subprocess (one thread, so that runs are bit-reproducible), on a tiny
Llama (hidden 32) trained for `STEPS` steps with `--save-every 2`:

1. an uninterrupted run gives the reference weights;
2. a run is killed with SIGKILL at a seeded random moment of training, for a random even
   step k: train and distill as soon as the hidden temporary of state k appears, after a
   random 0-5 ms (in the middle of writing that state, as a rule; should polling miss it,
   just after); unlearn once state k is complete, after a random 0-40 ms (in a later step
   or state);
3. a `--resume` run is killed in the middle of writing its output: its weights are in the
   temporary directory, its undo.json is not (a hook in the child process waits there);
4. a last `--resume` run finishes.

After every kill OUT does not exist (only a hidden `.OUT.undo-tmp-*` sibling may), and every
saved state `OUT.undo-state/step-*` is complete. The finished OUT equals the reference
(`torch.equal` on every tensor), resumed from the last state saved before kill 3, and nothing
is left beside it. The three commands run side by side (threads driving subprocesses), every
run through the warm `undo` of tests/forkserver.py, each in a process of its own (forked from
one that imported torch once): the runs that are killed run `RUNNER` there, and the kill is
a SIGKILL to that process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file

STEPS = 16
SEED = 20240607
TEXT = [f"{a} + {b} = {a + b}" for a in range(15) for b in range(6)]
FORGET = [f"{a} * {b} = {a * b}" for a in range(12) for b in range(8)]
COMMON = ["--max-length", "32", "--batch-size", "2", "--max-steps", str(STEPS), "--save-every",
          "2", "--log-every", "4", "--seed", "1", "--device", "cpu", "-q", "--json"]

# Runs `undo` with a hook: when UNDO_TEST_MARKER is set, the output's weights are written,
# then the marker file appears and the process waits (to be killed) before undo.json. It
# writes its process id to UNDO_TEST_PID first (the process to kill).
RUNNER = """
import os, sys, time
import undo_cli.checkpoint as checkpoint
pid_file = os.environ["UNDO_TEST_PID"]
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
marker = os.environ.get("UNDO_TEST_MARKER")
if marker:
    real_save_model = checkpoint.save_model
    def save_model_then_wait(*args, **kwargs):
        real_save_model(*args, **kwargs)
        open(marker, "w").close()
        time.sleep(120)
    checkpoint.save_model = save_model_then_wait
from undo_cli.cli import main
main()
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "UNDO_TEST_MARKER", "UNDO_TEST_PID"):
        if name not in extra:
            env.pop(name, None)
    return env


def _start(args: list, server, pid_file: Path, **env: str) -> subprocess.Popen:
    """`RUNNER ARGS` (the file runner.py beside `pid_file`) in a process of the warm `undo`;
    `pid_file` gets that process's id."""
    pid_file.unlink(missing_ok=True)
    proc = subprocess.Popen([*server.script, pid_file.parent / "runner.py", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(UNDO_TEST_PID=str(pid_file), **env))
    proc.pid_file = pid_file
    return proc


def _finish(args: list, server) -> dict:
    """A run to its end (the reference, the last --resume), through the warm `undo`
    (tests/forkserver.py: a process of its own, without the start-up): its --json summary."""
    done = subprocess.run([*server.argv, *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)


def _kill(proc: subprocess.Popen) -> None:
    """kill -9 the command's process; its client then exits 137 (killed, nothing reported)."""
    os.kill(int(proc.pid_file.read_text()), signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr.read()[-2000:]
    proc.stdout.close()
    proc.stderr.close()


def _state_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.undo-state"


def _saved_steps(out: Path) -> list[int]:
    """Steps of the saved states; each one must be complete (a half-written state only ever
    exists as a hidden .tmp-step-* directory, which --resume ignores)."""
    state = _state_dir(out)
    steps = []
    for p in sorted(state.iterdir()) if state.is_dir() else []:
        if p.name.startswith("step-"):
            assert (p / "complete.json").is_file(), f"incomplete state {p}"
            steps.append(int(p.name[len("step-"):]))
    return steps


def _reached(out: Path, k: int, mid_save: bool, seen: list[str]) -> bool:
    """Has the run begun writing state k (mid_save) or finished it? Later states count too,
    in case polling missed the moment; the name that triggered goes into `seen`."""
    state = _state_dir(out)
    try:
        names = [p.name for p in state.iterdir()]
    except FileNotFoundError:
        return False
    prefixes = (".tmp-step-", "step-") if mid_save else ("step-",)
    for name in names:
        for prefix in prefixes:
            if name.startswith(prefix) and int(name[len(prefix):]) >= k:
                seen.append(name)
                return True
    return False


def _assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a kill"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
                  or p.name.startswith(f"{out.name}."))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kill")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (d / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    return {"dir": d, "ckpt": make_checkpoint(d / "base"), "text": d / "text.jsonl",
            "forget": d / "forget.jsonl"}


def _command(name: str, files: dict[str, Path], out: Path) -> list:
    if name == "train":
        return ["train", out, "--init", files["ckpt"], "--data", files["text"], "--lr", "1e-3",
                *COMMON]
    if name == "unlearn":
        return ["unlearn", files["ckpt"], out, "--method", "graddiff", "--forget",
                files["forget"], "--retain", files["text"], *COMMON]
    return ["distill", out, "--teacher", files["ckpt"], "--student", "teacher", "--alpha", "0.6",
            "--beta", "0.1", "--data", files["text"], *COMMON]


def _kill_and_resume(name: str, files: dict[str, Path], root: Path, rng: random.Random,
                     mid_save: bool, server) -> dict:
    """The whole scenario for one command; returns what happened (for the test to check)."""
    reference = root / f"{name}-reference"
    _finish(_command(name, files, reference), server)
    out = root / name
    args = _command(name, files, out)
    report: dict = {"reference": reference, "out": out}

    # Kill 1: at a random moment of training.
    k = rng.randrange(4, STEPS - 2, 2)
    jitter = rng.uniform(0.0, 0.005 if mid_save else 0.04)
    seen: list[str] = []
    pid_file = root / f"pid-{name}"
    proc = _start(args, server, pid_file)
    _wait_for(proc, lambda: pid_file.is_file() and _reached(out, k, mid_save, seen))
    time.sleep(jitter)
    _kill(proc)
    _assert_no_output(out)
    saved = _saved_steps(out)
    assert saved and saved[-1] >= k - 2
    report["kill1"] = {"state": k, "trigger": seen[0], "jitter_s": round(jitter, 4),
                       "last_complete_state": saved[-1],
                       "half_written_state_left": any(p.name.startswith(".tmp-")
                                                      for p in _state_dir(out).iterdir())}

    # Kill 2: while the resumed run writes its output (weights written, undo.json not yet).
    marker = root / f"marker-{name}-writing"
    proc = _start([*args, "--resume"], server, pid_file, UNDO_TEST_MARKER=str(marker))
    _wait_for(proc, marker.is_file)
    temporaries = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.undo-tmp")]
    assert len(temporaries) == 1 and (temporaries[0] / "model.safetensors").is_file()
    assert not (temporaries[0] / "undo.json").exists()
    _kill(proc)
    _assert_no_output(out)
    report["kill2_saved"] = _saved_steps(out)[-1]

    # The last run finishes the job.
    summary = _finish([*args, "--resume"], server)
    report["resumed_from"] = summary["resumed_from"]
    return report


@pytest.fixture(scope="module")
def scenarios(files, tmp_path_factory, undo_server) -> dict:
    root = tmp_path_factory.mktemp("kill-runs")
    (root / "runner.py").write_text(RUNNER)
    rng = random.Random(SEED)
    seeds = {name: rng.randrange(2**31) for name in ("train", "unlearn", "distill")}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_kill_and_resume, name, files, root, random.Random(seed),
                                     mid_save=name != "unlearn", server=undo_server)
                   for name, seed in seeds.items()}
        return {name: future for name, future in futures.items()}


@pytest.mark.parametrize("name", ["train", "unlearn", "distill"])
def test_kill_9_then_resume_gives_the_uninterrupted_weights(scenarios, name):
    report = scenarios[name].result()  # re-raises what failed inside the scenario
    print(f"{name}: {report}")  # the kill points, shown with -s
    out, reference = report["out"], report["reference"]
    assert report["resumed_from"] == report["kill2_saved"] == STEPS - 2
    expected, got = _weights(reference), _weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["compute"]["steps"] == STEPS
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["type"] == "train"] == list(range(4, STEPS + 1, 4))
    assert _leftovers(out) == []  # stale temporaries and the training state are gone
