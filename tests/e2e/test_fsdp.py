"""FSDP2 on the CPU: 2 processes over gloo, with the weights really sharded.

`accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2` on a machine
without CUDA starts 2 processes (torchrun underneath). accelerate by itself would run them as
DDP (it turns FSDP on only for GPU process groups); the engine keeps the FSDP2 plugin
(`undo_cli.engine.processes._fsdp_on_cpu`) and torch's `fully_shard` shards over a CPU device
mesh. The runs use
a small runner around `undo` (`RUNNER`) with two test hooks:

- `UNDO_TEST_PROBE=DIR`: after the first optimizer step each process writes what it trains:
  the class, full shape and local shape of every trained parameter and the classes of the
  AdamW state tensors (the real objects the engine clips and steps, not a flag of ours);
- `UNDO_TEST_STOP_AFTER=K`: the run raises once the training state of step K is complete
  (an interruption at a known point; the state stays for `--resume`).

Checked, on a tiny Llama (hidden 32, 2 layers), 4 AdamW steps, `--batch-size` 2 x 2 processes
against one process with `--batch-size` 4 (TOLERANCE as in tests/e2e/test_multiprocess.py):

All in the default suite (about 25 s on 2 cores):

- `train` with `--save-every 2` (a sharded state is written and removed): every trained
  parameter is a DTensor whose local shards partition it, the AdamW state is sharded too;
  OUT loads with plain `AutoModelForCausalLM.from_pretrained` and matches one process
  (measured: max |difference| 2e-8); only the main process wrote;
- an interrupted run resumed from its sharded state equals the uninterrupted one bit for bit;
- `unlearn` (graddiff: `train` gets an explicit parameter list) matches one process
  (measured 1.8e-6);
- `distill` keeps its chunked loss under FSDP (the student's forward returns the logits of
  one position; accelerate's unit of final norm + LM head stays gathered and the loss applies
  the head weight directly) and matches one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from test_multiprocess import (
    COMMON,
    EXAMPLES,
    TOLERANCE,
    _env,
    _free_port,
    _one_thread,  # noqa: F401 - the module-wide fixture: one torch thread in this process
    check_only_main_wrote,
    max_difference,
    write_files,
)

STEPS = 4
RUNNER = """
import json, os, sys
from pathlib import Path

import undo_cli.engine.loop as engine

probe = os.environ.get("UNDO_TEST_PROBE")
stop_after = os.environ.get("UNDO_TEST_STOP_AFTER")
if probe:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    logits_positions = set()  # the sequence lengths of the logits the trained model returned

    def recording(real_forward):
        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            if self.training:
                logits_positions.add(out.logits.shape[1])
            return out
        return forward

    for cls in (LlamaForCausalLM, GPT2LMHeadModel):
        cls.forward = recording(cls.forward)
    real_step = engine._Trainer._step

    def step(self, lr):
        ok = real_step(self, lr)
        if not getattr(self, "_probed", False):
            self._probed = True
            local = lambda p: p.to_local() if hasattr(p, "to_local") else p
            state = [t for s in self.optimizer.state.values() for t in s.values()
                     if getattr(t, "ndim", 0) >= 1]
            record = {"distributed_type": str(self.accelerator.distributed_type),
                      "params": [[type(p).__name__, list(p.shape), list(local(p).shape)]
                                 for p in self.params],
                      "optimizer_state": sorted({type(t).__name__ for t in state}),
                      "logits_positions": sorted(logits_positions)}
            Path(probe, f"rank{self.accelerator.process_index}.json").write_text(
                json.dumps(record))
        return ok

    engine._Trainer._step = step
if stop_after:
    real_save = engine.save_state

    def save(accelerator, state_dir, step, key, **parts):
        real_save(accelerator, state_dir, step, key, **parts)
        if step == int(stop_after):
            raise RuntimeError(f"test stop after the state of step {step}")

    engine.save_state = save
from undo_cli.cli import app

sys.argv[0] = "undo"
app()
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fsdp")
    (d / "runner.py").write_text(RUNNER)
    gpt2 = make_checkpoint(d / "gpt2", arch="gpt2")
    config = json.loads((gpt2 / "config.json").read_text())  # no dropout: comparable runs
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (gpt2 / "config.json").write_text(json.dumps(config))
    return {**write_files(d), "runner": d / "runner.py", "gpt2": gpt2}


@pytest.fixture()
def launch(files, undo_server):
    """Start `undo ARGS` under `accelerate launch` with the shipped FSDP config, 2 processes,
    in a session of its own; at teardown the launcher and its workers are killed. Each
    process runs `RUNNER` in the warm `undo` of tests/forkserver.py (forked from a process
    that imported torch once; tests/e2e/test_multiprocess.py launches fresh interpreters)."""
    started: list[subprocess.Popen] = []

    def start(*args, **env: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(EXAMPLES / "fsdp.yaml"), "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", str(_free_port()), *undo_server.script[1:],
                str(files["runner"]), *(str(a) for a in args)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**_env(), **env}, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # no orphaned workers, finished or not
        proc.wait()


def _train_args(files) -> list:
    return ["--init", files["ckpt"], "--data", files["text"], "--max-steps", str(STEPS),
            "--lr", "1e-3", "--save-every", "2", *COMMON]


def _single(tmp_path: Path, command: str, before: list, after: list) -> Path:
    """The 1-process reference, in-process, with the global batch (--batch-size 4)."""
    from typer.testing import CliRunner

    from undo_cli.cli import app

    out = tmp_path / "one"
    r = CliRunner().invoke(app, [str(a) for a in (command, *before, out, *after,
                                                  "--batch-size", "4", "-q")])
    assert r.exit_code == 0, r.output
    return out


def _wait(proc: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


def check_sharded(probe: Path) -> None:
    """Every trained parameter is a DTensor, split across the 2 processes (the local shards
    add up to the full tensor, none holds all of it); the AdamW state is sharded too."""
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["distributed_type"] == "DistributedType.FSDP"
        assert {kind for kind, _, _ in record["params"]} == {"DTensor"}
        assert record["optimizer_state"] == ["DTensor"]
    for (_, full, a), (_, full_b, b) in zip(records[0]["params"], records[1]["params"],
                                            strict=True):
        assert full == full_b and a[1:] == b[1:] == full[1:]
        assert a[0] + b[0] == full[0] and a[0] < full[0] and b[0] < full[0], (full, a, b)


def test_train_under_fsdp_shards_and_matches_one_process(launch, files, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = tmp_path / "probe"
    probe.mkdir()
    out = tmp_path / "fsdp"
    proc = launch("train", out, *_train_args(files), "--batch-size", "2",
                  UNDO_TEST_PROBE=str(probe))
    single = _single(tmp_path, "train", [], _train_args(files))
    _, stderr = _wait(proc)
    check_sharded(probe)
    check_only_main_wrote(out, STEPS, stderr, single)  # and the sharded state was removed
    model = AutoModelForCausalLM.from_pretrained(out)  # an ordinary checkpoint
    reference = load_file(single / "model.safetensors")
    got = model.state_dict()
    assert got.keys() == reference.keys()
    difference = max(float((got[k].double() - reference[k].double()).abs().max())
                     for k in reference)
    print(f"train, FSDP vs 1 process: max |difference| {difference:.3g}")  # shown with -s
    assert difference < TOLERANCE
    moved = max(float((got[k] - load_file(files["ckpt"] / "model.safetensors")[k]).abs().max())
                for k in reference)
    assert moved > 100 * TOLERANCE  # it did train


@pytest.mark.slow  # 2 minutes of three launches; resume: test_kill_resume, FSDP: the tests above
def test_fsdp_resume_from_a_sharded_state_equals_the_uninterrupted_run(launch, files,
                                                                        tmp_path):
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = launch("train", full, *_train_args(files), "--batch-size", "2", "-q")
    stopped = launch("train", cut, *_train_args(files), "--batch-size", "2", "-q",
                     UNDO_TEST_STOP_AFTER="2")
    _, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode != 0 and "test stop after the state of step 2" in stderr
    assert not cut.exists()
    state = tmp_path / "cut.undo-state"
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002"]
    saved = state / "step-00000002"
    # One piece per process, safetensors and JSON only (no pickle anywhere).
    assert sorted(p.name for p in saved.iterdir()) == [
        "complete.json", "rank-0.json", "rank-0.safetensors", "rank-1.json",
        "rank-1.safetensors", "undo-state.json"]
    pieces = [load_file(saved / f"rank-{r}.safetensors") for r in (0, 1)]
    weights = [k for k in pieces[0] if k.startswith("model.") and pieces[0][k].ndim == 2]
    assert weights and all(k in pieces[1] for k in weights)
    assert any(pieces[0][k].numel() != pieces[1][k].numel() or not torch.equal(
        pieces[0][k], pieces[1][k]) for k in weights)  # shards, not two copies
    stdout, _ = _wait(launch("train", cut, *_train_args(files), "--batch-size", "2", "-q",
                             "--json", "--resume"))
    assert json.loads(stdout)["resumed_from"] == 2
    _wait(uninterrupted)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()


def test_unlearn_under_fsdp_matches_one_process(launch, files, tmp_path):
    """unlearn passes `train` its parameter list: the engine must clip and check the sharded
    parameters FSDP put in their place, not the originals."""
    after = ["--method", "graddiff", "--forget", files["forget"], "--retain", files["text"],
             "--max-steps", "3", *COMMON]
    probe = tmp_path / "probe"
    probe.mkdir()
    out = tmp_path / "fsdp"
    proc = launch("unlearn", files["ckpt"], out, *after, "--batch-size", "2",
                  UNDO_TEST_PROBE=str(probe))
    single = _single(tmp_path, "unlearn", [files["ckpt"]], after)
    _, stderr = _wait(proc)
    check_sharded(probe)
    check_only_main_wrote(out, 3, stderr, single)
    assert max_difference(out, single) < TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: head tied to the embedding
def test_distill_under_fsdp_is_chunked_and_matches_one_process(launch, files, tmp_path, arch):
    """Regression: calling the LM head module outside the student's forward (the chunked loss)
    freed the FSDP unit of final norm + head before the norm's backward (SIGSEGV). The chunked
    loss now applies the gathered head weight directly: the student's forward returns logits
    for one position only (the full batch x sequence x vocabulary logits never exist), and
    the result matches one process."""
    teacher = files["ckpt"] if arch == "llama" else files["gpt2"]
    after = ["--teacher", teacher, "--student", "teacher", "--alpha", "0.6", "--beta",
             "0.1", "--data", files["text"], "--max-steps", str(STEPS), "--save-every", "2",
             *COMMON]
    probe = tmp_path / "probe"
    probe.mkdir()
    out = tmp_path / "fsdp"
    proc = launch("distill", out, *after, "--batch-size", "2", UNDO_TEST_PROBE=str(probe))
    single = _single(tmp_path, "distill", [], after)
    _, stderr = _wait(proc)
    check_sharded(probe)  # the student; the frozen teacher is replicated on each process
    for rank in (0, 1):
        record = json.loads((probe / f"rank{rank}.json").read_text())
        assert record["logits_positions"] == [1], record["logits_positions"]
    check_only_main_wrote(out, STEPS, stderr, single)
    assert max_difference(out, single) < TOLERANCE
