"""Data parallelism on the CPU: 2 processes over gloo equal 1 process with twice the batch.

Each multi-process run starts a real launcher in a subprocess (train and relearn-attack:
`accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2`, which is
torchrun underneath; unlearn and distill: `python -m torch.distributed.run
--nproc_per_node 2`) on a tiny Llama (hidden 32) with packed text (every example has the
same number of labelled tokens, so the mean of the two processes' mean losses is the mean
over the global batch). The four runs start together. `train`'s processes are fresh
interpreters (`-m undo_cli`, as users launch it); the others' are forked from the warm `undo`
of tests/forkserver.py (the launcher's own processes, environment and process group, without
the imports: about 5 s of CPU each). Per command it checks that

- the weights match a single-process run with the same global batch (`--batch-size` 2 per
  process x 2 processes vs `--batch-size` 4): max |difference| below `TOLERANCE` (measured:
  2e-8 to 2e-6 after 3-4 AdamW steps; float sums in another order, nothing more);
- both processes counted the tokens of the global batch (`compute.tokens`, `processes` 2);
- only the main process wrote, logged and reported: one output directory and nothing else
  beside it, one train_log.jsonl line per step, each progress line and the final message
  once on stderr, one JSON document on stdout.

relearn-attack writes no weights: there every point of every run's curve (2 learning rates x
2 seeds, evaluated at steps 0, 2, 4; the evaluations split among the processes) matches one
process within `TOLERANCE` (measured: 2e-8 relative); `test_evaluation_is_split_among_processes`
checks the split itself. FSDP2 runs for real over gloo in
tests/e2e/test_fsdp.py; here, gathering the sharded weights for saving is also checked with a
stand-in accelerator (covering ZeRO-3 and tied weights), and the shipped accelerate configs
are checked to load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file

TOLERANCE = 1e-5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
TEXT = [f"{a} + {b} = {a + b}" for a in range(15) for b in range(6)]
FORGET = [f"{a} * {b} = {a * b}" for a in range(12) for b in range(8)]
ATTACK_COMMON = ["--max-length", "32", "--seed", "3", "--device", "cpu"]
COMMON = [*ATTACK_COMMON, "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _undo(server) -> list[str]:
    """What a launcher runs for `undo`: `-m undo_cli` (a fresh interpreter per process), or
    with the warm `undo` of tests/forkserver.py (`server`) its client, whose command runs in
    a process forked from one that imported torch once (the launcher, the processes, their
    environment and their process group are the same; only the imports are skipped)."""
    return ["-m", "undo_cli"] if server is None else server.argv[1:]


def accelerate_launch(*args: str, server=None) -> list[str]:
    """`accelerate launch` with the shipped DDP config, 2 processes. On a machine without CUDA
    a MULTI_GPU config (or `--multi_gpu`) is what starts them: it is torchrun underneath, and
    undo then talks over gloo. (`--cpu`, or `--num_processes 2` alone, starts one process.)"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(EXAMPLES / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
            str(_free_port()), *_undo(server), *args]


def torchrun(*args: str, server=None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *_undo(server), *args]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread in this process too: the launched processes need the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_files(d: Path) -> dict[str, Path]:
    """The tiny base checkpoint and the text / forget data the launched runs train on."""
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (d / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    return {"dir": d, "ckpt": make_checkpoint(d / "base"), "text": d / "text.jsonl",
            "forget": d / "forget.jsonl"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("mp"))


def _arguments(files: dict[str, Path]) -> dict[str, tuple[str, list, list]]:
    """command -> (launcher, arguments before OUT, arguments after OUT), shared by the
    multi-process run and its single-process reference (which has --batch-size 4, not 2)."""
    return {
        "train": ("accelerate", [], [
            "--init", files["ckpt"], "--data", files["text"], "--max-steps", "4", "--lr",
            "1e-3", *COMMON]),
        "unlearn": ("torchrun", [files["ckpt"]], [
            "--method", "graddiff", "--forget", files["forget"], "--retain", files["text"],
            "--max-steps", "3", *COMMON]),
        # Also saves training state every 2 steps (every process takes part; removed at
        # the end) and noises the student in memory on each process (identically).
        "distill": ("torchrun", [], [
            "--teacher", files["ckpt"], "--student", "teacher", "--alpha", "0.6", "--beta",
            "0.1", "--data", files["text"], "--max-steps", "4", "--save-every", "2",
            *COMMON]),
        # OUT is --out's value. 2 learning rates x 2 seeds, 4 steps each, evaluated at 0, 2, 4.
        "relearn-attack": ("accelerate", [files["ckpt"], "--out"], [
            "--data", files["forget"], "--eval", f"forget={files['forget']}", "--eval",
            f"retain={files['text']}", "--lrs", "1e-3,3e-3", "--seeds", "2", "--steps", "4",
            "--eval-every", "2", "--no-plot", "--json", *ATTACK_COMMON]),
    }


@pytest.fixture(scope="module")
def launched(files, tmp_path_factory, undo_server):
    """The 2-process runs, started together (their start-ups overlap). `train` runs as users
    run it (`accelerate launch ... -m undo_cli`, each process a fresh interpreter); the other
    commands' processes are the warm `undo`'s (`_undo`)."""
    root = tmp_path_factory.mktemp("mp-runs")
    runs = {}
    for command, (launcher, before, after) in _arguments(files).items():
        out = root / command
        wrap = accelerate_launch if launcher == "accelerate" else torchrun
        extra = ["--json"] if command == "train" else []
        server = None if command == "train" else undo_server
        argv = [str(a) for a in wrap(command, *before, out, *after, "--batch-size", "2",
                                     *extra, server=server)]
        # A session of its own, so that teardown can stop the launcher and its workers.
        runs[command] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=_env(), start_new_session=True), out)
    yield runs
    for proc, _ in runs.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # no orphaned workers, finished or not
        proc.wait()


def finish(launched, files, tmp_path, command: str):
    """Run the 1-process reference of `command` in-process; wait for its 2-process run."""
    from typer.testing import CliRunner

    from undo_cli.cli import app

    _, before, after = _arguments(files)[command]
    single = tmp_path / "one"
    r = CliRunner().invoke(app, [str(a) for a in (command, *before, single, *after,
                                                  "--batch-size", "4", "-q")])
    assert r.exit_code == 0, r.output
    proc, out = launched[command]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return out, single, stdout, stderr


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    difference = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    print(f"{a.name} vs {b.name}: max |difference| {difference:.3g}")  # shown with -s
    return difference


def check_only_main_wrote(out: Path, steps: int, stderr: str, single: Path) -> dict:
    """One output, nothing beside it, one log line per step, each message once."""
    beside = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
                    or p.name.startswith(f"{out.name}."))
    assert beside == [], beside  # no temporary directory, no training state left
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["type"] == "train"] == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert stderr.count(f"step {step}: ") == 1, stderr
    assert "error" not in stderr, stderr
    compute = json.loads((out / "undo.json").read_text())["compute"]
    reference = json.loads((single / "undo.json").read_text())["compute"]
    assert compute["processes"] == 2 and reference["processes"] == 1
    assert compute["tokens"] == reference["tokens"] and compute["steps"] == steps
    return compute


def test_train_with_accelerate_launch_matches_one_process(launched, files, tmp_path):
    out, single, stdout, stderr = finish(launched, files, tmp_path, "train")
    summary = json.loads(stdout)  # exactly one JSON document: only rank 0 printed
    assert summary["steps"] == 4 and summary["output"] == str(out)
    check_only_main_wrote(out, 4, stderr, single)
    assert max_difference(out, single) < TOLERANCE


def test_unlearn_with_torchrun_matches_one_process(launched, files, tmp_path):
    out, single, _, stderr = finish(launched, files, tmp_path, "unlearn")
    assert stderr.count(f"wrote {out}") == 1
    check_only_main_wrote(out, 3, stderr, single)
    assert max_difference(out, single) < TOLERANCE


def test_distill_with_torchrun_matches_one_process(launched, files, tmp_path):
    out, single, _, stderr = finish(launched, files, tmp_path, "distill")
    assert stderr.count(f"wrote {out}") == 1
    compute = check_only_main_wrote(out, 4, stderr, single)
    assert compute["flops_teacher"] > 0
    assert max_difference(out, single) < TOLERANCE


def test_relearn_attack_with_accelerate_launch_matches_one_process(launched, files, tmp_path):
    """Every run of the grid trains data-parallel and evaluates split among the processes;
    only the main one prints, reports and writes. Each curve matches one process with the
    global batch."""
    out, single, stdout, stderr = finish(launched, files, tmp_path, "relearn-attack")
    results = json.loads(stdout)  # exactly one JSON document: only rank 0 printed
    assert json.loads((out / "results.json").read_text()) == results
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "undo.json"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert stderr.count(f"wrote {out}") == 1 and "error" not in stderr
    for lr in ("0.001", "0.003"):
        for seed in (3, 4):
            assert stderr.count(f"lr{lr} seed {seed}: forget.loss") == 1, stderr
    reference = json.loads((single / "results.json").read_text())
    assert results["compute"]["tokens"] == reference["compute"]["tokens"] > 0
    processes = [json.loads((d / "undo.json").read_text())["compute"]["processes"]
                 for d in (out, single)]
    assert processes == [2, 1]
    assert results["initial"] == pytest.approx(reference["initial"], rel=TOLERANCE)
    assert len(results["runs"]) == len(reference["runs"]) == 4
    worst = 0.0
    for run, ref in zip(results["runs"], reference["runs"], strict=True):
        assert (run["lr"], run["seed"], run["diverged"]) == (ref["lr"], ref["seed"], False)
        assert [p["step"] for p in run["curve"]] == [p["step"] for p in ref["curve"]] == [0, 2, 4]
        for point, ref_point in zip(run["curve"], ref["curve"], strict=True):
            for key, value in ref_point.items():
                worst = max(worst, abs(point[key] - value) / max(1.0, abs(value)))
    print(f"relearn-attack: max relative |difference| of the curves {worst:.3g}")  # -s
    assert worst < TOLERANCE
    assert results["runs"][0]["curve"][-1]["forget.loss"] < results["initial"]["forget.loss"]


EVAL_RUNNER = """
import json, sys
import torch
import torch.distributed as dist
import undo_cli.evaluate as ev
from undo_cli.checkpoint import load_model, load_tokenizer

torch.set_num_threads(1)
dist.init_process_group("gloo")
ckpt, out, *paths = sys.argv[1:]
model, tok = load_model(ckpt), load_tokenizer(ckpt)
counted = {"scored": 0, "generated": 0}
real_score, real_generate = ev.score_sequences, ev.greedy_generate

def score(model, requests, **kw):
    counted["scored"] += len(requests)
    return real_score(model, requests, **kw)

def generate(model, tok, prompts, **kw):
    counted["generated"] += len(prompts)
    return real_generate(model, tok, prompts, **kw)

ev.score_sequences, ev.greedy_generate = score, generate
sets = [ev.load_eval_set(name, path, tok) for name, path in zip(("text", "sums", "pick"), paths)]
answers = {}
metrics = ev.evaluate_model(model, tok, sets, answers=answers, max_new_tokens=4)
with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
    json.dump({"metrics": metrics, "answers": answers, "counted": counted}, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_evaluation_is_split_among_processes(files, tmp_path, undo_server):
    """Under a launch every process scores and generates for its half of the requests and
    all gather the results: the metrics and the generated answers equal one process's (the
    order of the gathered answers and choice scores matters, so a mix-up would show)."""
    import random

    from undo_cli.checkpoint import load_model, load_tokenizer
    from undo_cli.evaluate import evaluate_model, load_eval_set

    rng = random.Random(5)
    sums, picks = [], []
    for i in range(21):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        sums.append({"prompt": f"{a} + {b} = ", "answer": str(a + b)})
        choices = [str(a + b + d) for d in rng.sample([-11, -1, 0, 1, 2, 10], 4)]
        picks.append({"question": f"{a} + {b} =", "choices": choices, "answer": i % 4})
    paths = [files["text"]]
    for name, rows in (("sums", sums), ("pick", picks)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "runner.py").write_text(EVAL_RUNNER)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *undo_server.script[1:],
            tmp_path / "runner.py", files["ckpt"], tmp_path, *paths]
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, tok = load_model(files["ckpt"]), load_tokenizer(files["ckpt"])
    sets = [load_eval_set(name, path, tok) for name, path in zip(("text", "sums", "pick"), paths)]
    answers: dict[str, list[str]] = {}
    reference = evaluate_model(model, tok, sets, answers=answers, max_new_tokens=4)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["answers"] == answers and len(answers["sums"]) == 21
        assert got["metrics"].keys() == reference.keys()
        for name, values in reference.items():
            assert got["metrics"][name].keys() == values.keys()
            for key, value in values.items():
                assert got["metrics"][name][key] == pytest.approx(value, rel=1e-6), (name, key)
    scored = [got["counted"]["scored"] for got in ranks]
    generated = [got["counted"]["generated"] for got in ranks]
    assert generated == [11, 10]  # 21 prompts: contiguous halves
    # at least one request per text record, one per sum, 4 continuations per question
    assert sum(scored) >= reference["text"]["n"] + 21 + 4 * 21
    assert 0 < scored[1] <= scored[0] < sum(scored)


@pytest.mark.parametrize("argv", [
    ["init", "{out}"],
    ["data", "arithmetic", "{out}"],
    ["perturb", "{ckpt}", "{out}"],
    ["eval", "{ckpt}", "--data", "{text}", "--out", "{out}"],
    ["report", "{out}", "--out", "{out}"],
    ["relearn-attack", "--compare", "{out}", "--out", "{out}"],
], ids=lambda argv: " ".join(a for a in argv if not a.startswith("{")))
def test_commands_that_do_not_shard_refuse_a_multi_process_launch(cli, files, tmp_path,
                                                                   monkeypatch, argv):
    """Under a launcher every process would write the same output: refused, exit 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate launch set
    out = tmp_path / "out"
    r = cli(*(a.format(out=out, ckpt=files["ckpt"], text=files["text"]) for a in argv))
    assert r.exit_code == 2 and "runs in one process" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_relearn_attack_refuses_fsdp(cli, files, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what an FSDP config's launch sets
    r = cli("relearn-attack", files["ckpt"], "--data", files["text"], "--eval",
            f"forget={files['forget']}", "--max-length", "32", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "not under FSDP" in r.stderr and "ddp.yaml" in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sharded_weights_are_gathered_into_a_plain_model(tmp_path, arch):
    """FSDP / ZeRO-3: the engine rebuilds a plain model on the main
    process from accelerate's full state dict, and that is what gets saved. Checked with a
    stand-in accelerator: equal weights, tied ones re-tied, a missing untied one refused."""
    import types

    from accelerate.utils import DistributedType

    from undo_cli.checkpoint import load_model
    from undo_cli.engine.processes import gather_full_model
    from undo_cli.errors import UndoError

    model = load_model(make_checkpoint(tmp_path / arch, arch=arch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, deepspeed_config=None, is_main_process=True,
        get_state_dict=lambda prepared: state)
    full = gather_full_model(accelerator, model, model)
    assert full is not model
    got = full.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    del state["lm_head.weight"]  # GPT-2 ties it to the embedding; Llama does not
    if arch == "gpt2":
        assert torch.equal(gather_full_model(accelerator, model, model).lm_head.weight,
                           model.lm_head.weight)
    else:
        with pytest.raises(UndoError, match="lm_head.weight"):
            gather_full_model(accelerator, model, model)
    accelerator.distributed_type = DistributedType.MULTI_GPU  # DDP: nothing to gather
    assert gather_full_model(accelerator, model, model) is model


def test_the_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"ddp.yaml": (DistributedType.MULTI_GPU, 1),
                "fsdp.yaml": (DistributedType.FSDP, 1),
                "fsdp_offload.yaml": (DistributedType.FSDP, 1),
                "multinode.yaml": (DistributedType.MULTI_GPU, 2)}
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(expected)
    for name, (kind, machines) in expected.items():
        config = load_config_from_file(str(EXAMPLES / name))
        assert (config.distributed_type, config.num_machines) == (kind, machines), name
        assert config.mixed_precision == "no", name  # bf16 is undo's --bf16
    fsdp = load_config_from_file(str(EXAMPLES / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2  # prepare(model, optimizer) together, as the engine does
