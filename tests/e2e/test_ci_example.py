"""examples/ci/: release_gate.sh on a tiny random model, once passing and once failing (exit 3,
results still written); the GitHub Actions workflow is checked as a file, never run. The
passing and failing runs call the warm `undo` of tests/forkserver.py (`UNDO`, which the script
takes); the run stopped by a malformed gate calls `undo` on PATH, as CI does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"
SCRIPT = EXAMPLES / "release_gate.sh"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from undo_cli.modelfactory import DEFAULT_ALPHABET
    from undo_cli.synthetic import generate_arithmetic

    root = tmp_path_factory.mktemp("ci")
    model = make_checkpoint(root / "candidate", layers=1, hidden=32, heads=4, intermediate=64,
                            alphabet=DEFAULT_ALPHABET, max_position=128)
    generate_arithmetic(root / "data", train_size=40, eval_size=8)
    return {"root": root, "model": model, "data": root / "data"}


def run_gate(setup: dict[str, Path], name: str, *args: str, server=None, **settings: str):
    """Run the script as CI would: `undo` found on PATH (this interpreter's environment), or
    with `server` its warm `undo` (each command a process of its own, without the imports)."""
    artifacts = setup["root"] / name
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",  # a tiny model: threads only cost
           "ARTIFACTS": str(artifacts), "DATA_DIR": str(setup["data"]),
           "EVAL_LIMIT": "4", "ATTACK_LRS": "1e-3,1e-2", "ATTACK_STEPS": "5",
           "ATTACK_EVAL_EVERY": "5", "EVAL_ARGS": "--max-new-tokens 3",
           "ATTACK_ARGS": "--max-length 64 --batch-size 4 --max-new-tokens 3 --no-plot",
           **settings}
    env.pop("UNDO", None)
    if server is not None:
        env["UNDO"] = server.command
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=setup["root"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert "Traceback" not in result.stderr
    return result, artifacts


def test_release_gate_passes(setup, undo_server):
    model = str(setup["model"])
    r, artifacts = run_gate(setup, "pass", model, model,  # the model as its own reference
                            server=undo_server,
                            MAX_FORGET_ACCURACY="0.5", MIN_RETAIN_ACCURACY="0",
                            MAX_RETAIN_DROP="0.03", MAX_RELEARNED_ACCURACY="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.rstrip().endswith(f"release gate: passed; results in {artifacts}")
    evaluation = json.loads((artifacts / "eval.json").read_text())
    assert evaluation["reference"]["checkpoint"] == model
    assert [g["expression"] for g in evaluation["gates"]] == [
        "forget.accuracy > 0.5", "retain.accuracy < 0",
        "retain.accuracy < teacher.retain.accuracy - 0.03"]
    assert not any(g["failed"] for g in evaluation["gates"])
    attack = json.loads((artifacts / "relearn" / "results.json").read_text())
    assert attack["attack"]["lrs"] == [1e-3, 1e-2] and attack["attack"]["steps"] == 5
    assert [g["failed"] for g in attack["gates"]] == [False]
    assert (artifacts / "relearn" / "undo.json").exists()


def test_release_gate_fails_with_exit_3_and_keeps_the_results(setup, undo_server):
    model = str(setup["model"])
    r, artifacts = run_gate(setup, "fail", model, server=undo_server,
                            MIN_RETAIN_ACCURACY="0.5",  # a random model gets 0
                            MAX_RELEARNED_ACCURACY="-1")  # a bound no model meets
    assert r.returncode == 3, r.stderr
    evaluation = json.loads((artifacts / "eval.json").read_text())
    retain = evaluation["results"][0]["metrics"]["retain"]["accuracy"]
    assert retain < 0.5
    assert [g["failed"] for g in evaluation["gates"]] == [False, True]  # forget, retain
    assert (f"error: gate failed: retain.accuracy < 0.5 (retain.accuracy = {retain:.4g}) "
            f"for {model}") in r.stderr
    # The attack still ran after the failed eval gate, and failed its own gate.
    attack = json.loads((artifacts / "relearn" / "results.json").read_text())
    assert [g["failed"] for g in attack["gates"]] == [True]
    assert "error: gate failed: worst.forget.accuracy > -1 (worst.forget.accuracy = " \
        in r.stderr
    assert r.stderr.rstrip().endswith(
        f"release gate: FAILED (eval relearn-attack); results in {artifacts}")


def test_release_gate_stops_on_other_errors(setup):
    # A threshold that is not a number makes a malformed gate: exit 2 from undo eval, before
    # any model is loaded, and the script stops there (no attack).
    r, artifacts = run_gate(setup, "bad", str(setup["model"]), MAX_FORGET_ACCURACY="high")
    assert r.returncode == 2, r.stderr
    assert "unknown name 'high'" in r.stderr
    assert "release gate: eval could not run (exit 2)" in r.stderr
    assert not (artifacts / "relearn").exists()
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "CANDIDATE [REFERENCE]" in usage.stderr


def test_the_workflow_uploads_results_even_when_the_gate_fails():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    steps = workflow["jobs"]["gate"]["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert runs.index("download.pytorch.org/whl/cpu") < runs.index("undo-cli")  # CPU torch first
    assert "release_gate.sh" in runs and "${{" not in runs  # inputs come in through env
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "always()"
    assert upload["with"]["path"].rstrip("/") == workflow["jobs"]["gate"]["env"]["ARTIFACTS"]
