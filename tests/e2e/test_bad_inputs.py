"""The bad-input matrix: every subcommand, every kind of wrong argument or malformed file.

Each case must end with exit code 2 (usage: a bad argument, path or data file) or 1 (runtime:
a file that exists but cannot be read), exactly one line on stderr that starts with
`error: ` and says what to fix, no traceback, and nothing left behind: the case's working
directory (where OUT would go) is byte-for-byte as before, and so are the inputs.

The cases are one table (`CASES`) so that the matrix is visible; `{name}` placeholders are
the fixture files built once in `inputs`. Loading untrusted checkpoints is covered too:
pickled weights are refused without --allow-pickle (`*-pickle-refused`), a checkpoint's own
code does not run without --trust-remote-code (`*-remote-code-refused`: its module would
write a file into the inputs), and a malicious pickle is not executed even with
--allow-pickle (tests/unit/test_checkpoint.py::test_malicious_pickle_is_not_executed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

TEXT = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(5)]
PAIRS = [{"prompt": f"{a} * 2 =", "completion": f" {2 * a}"} for a in range(10)]
FAST = ["--max-length", "32", "--batch-size", "2", "--max-steps", "1", "-q", "--device", "cpu"]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and bad input files, shared by all cases (checked unchanged after each)."""
    d = tmp_path_factory.mktemp("bad-inputs")
    ckpt = make_checkpoint(d / "ckpt")
    files = {"dir": d, "ckpt": ckpt}
    files["text"] = _write_jsonl(d / "text.jsonl", [{"text": t} for t in TEXT])
    files["pairs"] = _write_jsonl(d / "pairs.jsonl", PAIRS)
    files["bad"] = d / "bad.jsonl"  # line 2 is not JSON
    files["bad"].write_text('{"text": "1 + 1 = 2"}\n{"text": "2 + 2 = \n{"text": "3"}\n')
    files["shape"] = _write_jsonl(d / "shape.jsonl", [{"text": "ok"}, {"question": 1, "x": 2}])
    files["empty"] = d / "empty.jsonl"
    files["empty"].write_text("")
    files["notjson"] = d / "notes.txt"
    files["notjson"].write_text("just words\n")
    # A directory that is not a checkpoint.
    files["notckpt"] = d / "notckpt"
    files["notckpt"].mkdir()
    (files["notckpt"] / "readme.txt").write_text("hello\n")
    # A checkpoint whose weights file is garbage (truncated / corrupt safetensors).
    files["corrupt"] = d / "corrupt"
    shutil.copytree(ckpt, files["corrupt"])
    weights = (files["corrupt"] / "model.safetensors").read_bytes()
    (files["corrupt"] / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    # A checkpoint whose config.json is not JSON.
    files["badconfig"] = d / "badconfig"
    shutil.copytree(ckpt, files["badconfig"])
    (files["badconfig"] / "config.json").write_text("{not json")
    # A checkpoint with pickled weights only (refused without --allow-pickle).
    files["pickle"] = d / "pickle"
    shutil.copytree(ckpt, files["pickle"])
    from safetensors.torch import load_file

    state = load_file(files["pickle"] / "model.safetensors")
    (files["pickle"] / "model.safetensors").unlink()
    torch.save(state, files["pickle"] / "pytorch_model.bin")
    # A checkpoint that needs its own code, which writes PWNED beside itself when imported
    # (refused without --trust-remote-code: the snapshot of the inputs shows it never ran).
    files["remote"] = d / "remote"
    shutil.copytree(ckpt, files["remote"])
    config = json.loads((files["remote"] / "config.json").read_text())
    config.update(model_type="evilllama", auto_map={
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (files["remote"] / "config.json").write_text(json.dumps(config))
    (files["remote"] / "modeling_evil.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('PWNED').write_text('code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    # relearn-attack results: one readable, one with malformed results.json.
    files["results"] = d / "results"
    files["results"].mkdir()
    (files["results"] / "results.json").write_text(json.dumps({
        "checkpoint": "/models/x", "fingerprint": "sha256:x", "forget_metric": "forget.loss",
        "direction": "min", "initial": {"forget.loss": 3.0, "retain.loss": 2.0},
        "worst_case": [{"step": 0, "value": 3.0}], "summary": {"final": 3.0, "auc": 3.0},
        "runs": [], "attack": {}}))
    (files["results"] / "undo.json").write_text(json.dumps({"stage": "relearn-attack",
                                                             "compute": {}, "parents": []}))
    files["badresults"] = d / "badresults"
    files["badresults"].mkdir()
    (files["badresults"] / "results.json").write_text('{"checkpoint": ')
    return files


# (id, argv, exit code, fragment of the message). `{out}` is OUT inside the case's own empty
# working directory; `{full}` is a non-empty directory there and `{file}` a file there.
CASES = [
    # ---- init
    ("init-heads-do-not-divide", ["init", "{out}", "--hidden", "30", "--heads", "4"], 2,
     "not divisible by --heads"),
    ("init-zero-heads", ["init", "{out}", "--heads", "0"], 2, "--heads"),
    ("init-unknown-arch", ["init", "{out}", "--arch", "rnn"], 2, "rnn"),
    ("init-unknown-preset", ["init", "{out}", "--preset", "huge"], 2, "huge"),
    ("init-zero-layers", ["init", "{out}", "--layers", "0"], 2, "--layers must be positive"),
    ("init-not-a-number", ["init", "{out}", "--hidden", "wide"], 2, "--hidden"),
    ("init-missing-tokenizer", ["init", "{out}", "--tokenizer", "{dir}/missing.json"], 2,
     "missing.json"),
    ("init-output-is-a-file", ["init", "{file}"], 2, "not a directory"),
    ("init-output-not-empty", ["init", "{full}"], 2, "--overwrite"),
    # ---- data arithmetic
    ("data-zero-train-size", ["data", "arithmetic", "{out}", "--train-size", "0"], 2,
     "--train-size"),
    ("data-heldout-out-of-range", ["data", "arithmetic", "{out}", "--heldout-pairs", "0.9"], 2,
     "--heldout-pairs"),
    ("data-word-fraction-out-of-range",
     ["data", "arithmetic", "{out}", "--word-fraction", "1.5"], 2, "--word-fraction"),
    ("data-zero-mul-max", ["data", "arithmetic", "{out}", "--mul-max", "0"], 2, "--mul-max"),
    ("data-output-not-empty", ["data", "arithmetic", "{full}"], 2, "--overwrite"),
    # ---- train
    ("train-missing-data", ["train", "{out}", "--init", "tiny", "--data", "{dir}/nope.jsonl",
                            *FAST], 2, "nope.jsonl"),
    ("train-malformed-jsonl", ["train", "{out}", "--init", "tiny", "--data", "{bad}", *FAST],
     2, "bad.jsonl:2:"),
    ("train-wrong-record-shape", ["train", "{out}", "--init", "tiny", "--data", "{shape}",
                                  *FAST], 2, "shape.jsonl:2:"),
    ("train-empty-data", ["train", "{out}", "--init", "tiny", "--data", "{empty}", *FAST], 2,
     "empty.jsonl"),
    ("train-unknown-file-type", ["train", "{out}", "--init", "tiny", "--data", "{notjson}",
                                 *FAST], 2, "notes.txt"),
    ("train-bad-weight", ["train", "{out}", "--init", "tiny", "--data", "{text}:heavy", *FAST],
     2, "heavy"),
    ("train-negative-lr", ["train", "{out}", "--init", "tiny", "--data", "{text}", "--lr", "-1",
                           *FAST], 2, "--lr"),
    ("train-lr-not-a-number", ["train", "{out}", "--init", "tiny", "--data", "{text}", "--lr",
                               "fast", *FAST], 2, "--lr"),
    ("train-zero-batch", ["train", "{out}", "--init", "tiny", "--data", "{text}", *FAST,
                          "--batch-size", "0"], 2, "--batch-size"),
    ("train-unknown-schedule", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                                "--schedule", "step", *FAST], 2, "--schedule"),
    ("train-unknown-init", ["train", "{out}", "--init", "{dir}/nowhere", "--data", "{text}",
                            *FAST], 2, "neither a checkpoint directory nor a preset"),
    ("train-output-is-a-file", ["train", "{file}", "--init", "tiny", "--data", "{text}",
                                *FAST], 2, "not a directory"),
    ("train-output-inside-input", ["train", "{ckpt}/sub", "--init", "{ckpt}", "--data",
                                   "{text}", *FAST], 2, "inside input"),
    ("train-eval-bad-name", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                             "--eval", "9x={pairs}", *FAST], 2, "NAME may use"),
    ("train-pickle-refused", ["train", "{out}", "--init", "{pickle}", "--data", "{text}",
                              *FAST], 2, "--allow-pickle"),
    ("train-remote-code-refused", ["train", "{out}", "--init", "{remote}", "--data", "{text}",
                                   *FAST], 1, "--trust-remote-code"),
    ("train-corrupt-safetensors", ["train", "{out}", "--init", "{corrupt}", "--data", "{text}",
                                   *FAST], 1, "cannot load model"),
    # ---- unlearn
    ("unlearn-unknown-method", ["unlearn", "{ckpt}", "{out}", "--method", "forgetall",
                                "--forget", "{text}", *FAST], 2, "forgetall"),
    ("unlearn-not-a-checkpoint", ["unlearn", "{notckpt}", "{out}", "--method", "ga",
                                  "--forget", "{text}", *FAST], 2, "config.json"),
    ("unlearn-config-not-json", ["unlearn", "{badconfig}", "{out}", "--method", "ga",
                                 "--forget", "{text}", *FAST], 2, "config.json"),
    ("unlearn-corrupt-safetensors", ["unlearn", "{corrupt}", "{out}", "--method", "ga",
                                     "--forget", "{text}", *FAST], 1, "cannot load model"),
    ("unlearn-ga-with-retain", ["unlearn", "{ckpt}", "{out}", "--method", "ga", "--forget",
                                "{text}", "--retain", "{pairs}", *FAST], 2, "retain"),
    ("unlearn-npo-zero-beta", ["unlearn", "{ckpt}", "{out}", "--method", "npo", "--forget",
                               "{text}", "--beta", "0", *FAST], 2, "--beta"),
    ("unlearn-rmu-layer-out-of-range", ["unlearn", "{ckpt}", "{out}", "--method", "rmu",
                                        "--forget", "{text}", "--layer", "9", *FAST], 2,
     "--layer"),
    ("unlearn-bad-regex", ["unlearn", "{ckpt}", "{out}", "--method", "ga", "--forget",
                           "{text}", "--trainable", "([", *FAST], 2, "--trainable"),
    ("unlearn-regex-matches-nothing", ["unlearn", "{ckpt}", "{out}", "--method", "ga",
                                       "--forget", "{text}", "--trainable", "nosuchlayer",
                                       *FAST], 2, "nosuchlayer"),
    ("unlearn-negative-sam", ["unlearn", "{ckpt}", "{out}", "--method", "ga", "--forget",
                              "{text}", "--sam", "-0.1", *FAST], 2, "--sam"),
    ("unlearn-malformed-forget", ["unlearn", "{ckpt}", "{out}", "--method", "ga", "--forget",
                                  "{bad}", *FAST], 2, "bad.jsonl:2:"),
    ("unlearn-output-equals-input", ["unlearn", "{ckpt}", "{ckpt}", "--method", "ga",
                                     "--forget", "{text}", *FAST], 2, "input"),
    # ---- perturb
    ("perturb-alpha-out-of-range", ["perturb", "{ckpt}", "{out}", "--alpha", "1.5"], 2,
     "--alpha"),
    ("perturb-negative-beta", ["perturb", "{ckpt}", "{out}", "--beta", "-1"], 2, "--beta"),
    ("perturb-unknown-noise", ["perturb", "{ckpt}", "{out}", "--noise", "gaussian"], 2,
     "gaussian"),
    ("perturb-bad-shard-size", ["perturb", "{ckpt}", "{out}", "--max-shard-size", "12XB"], 2,
     "12XB"),
    ("perturb-bad-regex", ["perturb", "{ckpt}", "{out}", "--include", "(["], 2, "(["),
    ("perturb-missing-input", ["perturb", "{dir}/nowhere", "{out}"], 2, "not found"),
    ("perturb-corrupt-safetensors", ["perturb", "{corrupt}", "{out}"], 2, "truncated"),
    ("perturb-pickle-refused", ["perturb", "{pickle}", "{out}"], 2, "safetensors"),
    ("perturb-output-contains-input", ["perturb", "{ckpt}", "{dir}"], 2, "contains input"),
    ("perturb-output-not-empty", ["perturb", "{ckpt}", "{full}"], 2, "--overwrite"),
    # ---- distill
    ("distill-missing-student", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                 "{dir}/nowhere", "--data", "{text}", *FAST], 2, "nowhere"),
    ("distill-teacher-not-a-checkpoint", ["distill", "{out}", "--teacher", "{notckpt}",
                                          "--student", "random", "--data", "{text}", *FAST], 2,
     "config.json"),
    ("distill-malformed-stop-when", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                     "random", "--data", "{text}", "--eval", "retain={pairs}",
                                     "--stop-when", "retain.accuracy >=", *FAST], 2,
     "--stop-when"),
    ("distill-stop-when-unknown-metric", ["distill", "{out}", "--teacher", "{ckpt}",
                                          "--student", "random", "--data", "{text}", "--eval",
                                          "retain={pairs}", "--stop-when",
                                          "retain.bleu >= teacher", *FAST], 2, "retain.bleu"),
    ("distill-stop-when-without-eval", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                        "random", "--data", "{text}", "--stop-when",
                                        "retain.loss <= teacher", *FAST], 2, "--eval"),
    ("distill-zero-temperature", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                  "random", "--data", "{text}", "--temperature", "0", *FAST], 2,
     "--temperature"),
    ("distill-unknown-noise", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                               "teacher", "--alpha", "0.5", "--beta", "0.1", "--noise", "pink",
                               "--data", "{text}", *FAST], 2, "--noise"),
    ("distill-no-student", ["distill", "{out}", "--teacher", "{ckpt}", "--data", "{text}",
                            *FAST], 2, "--student"),
    # ---- relearn-attack
    ("relearn-nothing-to-measure", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--out",
                                    "{out}", "--steps", "1"], 2, "--eval"),
    ("relearn-bad-lr-list", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--eval",
                             "forget={pairs}", "--lrs", "1e-3,fast", "--out", "{out}"], 2,
     "--lrs"),
    ("relearn-unknown-forget-metric", ["relearn-attack", "{ckpt}", "--data", "{pairs}",
                                       "--eval", "forget={pairs}", "--forget-metric",
                                       "forget.bleu", "--max-length", "32", "--out", "{out}"],
     2, "forget.bleu"),
    ("relearn-malformed-gate", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--eval",
                                "forget={pairs}", "--fail-if", "worst.forget.accuracy >> 1",
                                "--out", "{out}"], 2, "--fail-if"),
    ("relearn-unsupported-bits", ["relearn-attack", "{ckpt}", "--eval", "forget={pairs}",
                                  "--quantize", "3", "--out", "{out}"], 2, "--quantize"),
    ("relearn-missing-checkpoint", ["relearn-attack", "--eval", "forget={pairs}", "--out",
                                    "{out}"], 2, "CKPT"),
    ("relearn-compare-missing-results", ["relearn-attack", "--compare", "{dir}/nowhere",
                                         "--out", "{out}"], 2, "nowhere"),
    # ---- eval
    ("eval-data-without-name", ["eval", "{ckpt}", "--data", "={pairs}"], 2, "NAME=PATH"),
    ("eval-missing-data", ["eval", "{ckpt}", "--data", "x={dir}/nope.jsonl"], 2, "nope.jsonl"),
    ("eval-malformed-jsonl", ["eval", "{ckpt}", "--data", "x={bad}"], 2, "bad.jsonl:2:"),
    ("eval-unknown-builtin-set", ["eval", "{ckpt}", "--data", "x=arithmetic:nosuch"], 2,
     "nosuch"),
    ("eval-unknown-choice-format", ["eval", "{ckpt}", "--data", "x={pairs}", "--choice-format",
                                    "roman"], 2, "roman"),
    ("eval-malformed-gate", ["eval", "{ckpt}", "--data", "x={pairs}", "--fail-if",
                             "x.accuracy >"], 2, "--fail-if"),
    ("eval-gate-unknown-metric", ["eval", "{ckpt}", "--data", "x={pairs}", "--fail-if",
                                  "x.bleu > 0.5"], 2, "x.bleu"),
    ("eval-not-a-checkpoint", ["eval", "{notckpt}", "--data", "x={pairs}"], 2, "config.json"),
    ("eval-corrupt-safetensors", ["eval", "{corrupt}", "--data", "x={pairs}"], 1,
     "cannot load model"),
    ("eval-remote-code-refused", ["eval", "{remote}", "--data", "x={pairs}"], 1,
     "--trust-remote-code"),
    ("eval-zero-batch", ["eval", "{ckpt}", "--data", "x={pairs}", "--batch-size", "0"], 2,
     "--batch-size"),
    # ---- report
    ("report-not-a-results-dir", ["report", "{notckpt}", "--out", "{out}"], 2, "results.json"),
    ("report-malformed-results", ["report", "{badresults}", "--out", "{out}"], 2,
     "results.json"),
    ("report-duplicate-labels", ["report", "a={results}", "a={results}", "--out", "{out}"], 2,
     "labels must be unique"),
    ("report-output-inside-input", ["report", "{results}", "--out", "{results}/report"], 2,
     "inside input"),
    ("report-output-not-empty", ["report", "{results}", "--out", "{full}"], 2, "--overwrite"),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its contents (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def test_the_matrix_is_large_and_covers_every_command():
    commands = {argv[0] if argv[0] != "data" else "data arithmetic" for _, argv, _, _ in CASES}
    assert commands == {"init", "data arithmetic", "train", "unlearn", "perturb", "distill",
                        "relearn-attack", "eval", "report"}
    assert len(CASES) >= 30
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cli, inputs, tmp_path, case_id, argv, code, fragment):
    work = tmp_path / "work"
    work.mkdir()
    full = work / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep me\n")
    (work / "file.txt").write_text("a file\n")
    names = {k: str(v) for k, v in inputs.items()}
    names.update(out=str(work / "out"), full=str(full), file=str(work / "file.txt"))
    args = [a.format(**names) for a in argv]
    before_work, before_inputs = _snapshot(work), _snapshot(inputs["dir"])

    result = cli(*args)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == code, f"{case_id}: exit {result.exit_code}\n{result.stderr}"
    # One error line, the last; only `eval` shows a status line ("evaluating CKPT") before.
    assert len(errors) == 1 and lines[-1] == errors[0], f"{case_id}:\n{result.stderr}"
    assert len(lines) == 1 or (argv[0] == "eval" and len(lines) == 2), result.stderr
    assert fragment in errors[0], f"{case_id}: {fragment!r} not in {errors[0]!r}"
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert _snapshot(work) == before_work, f"{case_id} left something behind"
    assert _snapshot(inputs["dir"]) == before_inputs, f"{case_id} changed an input"


def test_debug_prints_the_traceback(cli, inputs, tmp_path):
    """`undo --debug` re-raises: Python shows the traceback (and exits with 1)."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "undo_cli", "--debug", "perturb", str(inputs["corrupt"]),
            str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert not (tmp_path / "out").exists()
    plain = subprocess.run([a for a in args if a != "--debug"], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("error: ") and len(plain.stderr.splitlines()) == 1
