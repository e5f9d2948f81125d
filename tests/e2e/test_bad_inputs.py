"""The bad-input matrix: every subcommand, every kind of wrong argument or malformed file.

Each case must end with exit code 2 (a bad argument, path or input file: every case today;
1 would be a runtime failure), exactly one line on stderr that starts with `error: ` and
says what to fix (only `eval` may print its status line before it: nothing else, no
warnings), no traceback, and nothing left behind: the case's working directory (where OUT
would go) is byte-for-byte as before, and so are the inputs.

The cases are one table (`CASES`) so that the matrix is visible; `{name}` placeholders are
the fixture files built once in `inputs`. Loading untrusted checkpoints is covered too:
pickled weights and adapters are refused without --allow-pickle (`*-pickle*-refused`), a
checkpoint's own code does not run without --trust-remote-code (`*-remote-code-refused`: its
module would write a file into the inputs), and a malicious pickle is not executed even with
--allow-pickle (tests/unit/test_checkpoint.py::test_malicious_pickle_is_not_executed).

Issue 19's cases (the second half of the table): checkpoints that would load only in part
(a missing, unexpected, mis-shaped or integer tensor, more layers declared than stored, a
model too big for memory), malformed JSON of every kind (index, config, adapter config,
tokenizer config, results, manifests), adapters based on themselves, NaN weights given to
perturb, paths read or written inside OUT or inside an input, another run holding OUT's
lock, names too long, training states undo did not write (a planted pickle: it would write
PWNED into the inputs if it ran), FIFOs and devices as data, CSV rows with extra fields,
990-term gates and non-finite or out-of-range numbers.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
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


def _variant(ckpt: Path, dst: Path, *, config=None, tensors=None, drop=()) -> Path:
    """A copy of checkpoint `ckpt` with config.json entries replaced (`config`), tensors
    replaced or added (`tensors`) and tensors removed (`drop`)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None or drop:
        state = load_file(dst / "model.safetensors")
        state.update(tensors or {})
        for name in drop:
            del state[name]
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


class _Bomb:
    """Unpickling this writes PWNED beside the pickle (the inputs' snapshot would show it)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def _state_inputs(d: Path, files: dict) -> None:
    """Training-state directories undo must refuse on --resume."""
    # An old (pickled) state, without undo's marker: never loaded, never deleted.
    old = d / "oldstate" / "step-00000002"
    old.mkdir(parents=True)
    (old / "complete.json").write_text(json.dumps({"step": 2, "config": {}}))
    with open(old / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Bomb(str(d / "oldstate" / "PWNED")), f)
    files["oldstate"] = d / "oldstate"
    # A state carrying undo's marker with a pickle planted in it: refused before any read.
    planted = d / "planted" / "step-00000002"
    planted.mkdir(parents=True)
    (planted / "undo-state.json").write_text(json.dumps(
        {"undo": "undo-training-state", "format": 1, "step": 2}))
    (planted / "complete.json").write_text(json.dumps({"step": 2, "config": {}}))
    with open(planted / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Bomb(str(d / "planted" / "PWNED")), f)
    files["planted"] = d / "planted"


def _adapter_inputs(d: Path, ckpt: Path, files: dict) -> None:
    """A real LoRA adapter on `ckpt` and broken variants of it."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = d / "adapter"
    model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(ckpt)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    files["adapter"] = adapter
    # Pickled adapter weights (adapter_model.bin only): refused without --allow-pickle.
    files["pickleadapter"] = d / "pickleadapter"
    shutil.copytree(adapter, files["pickleadapter"])
    state = load_file(files["pickleadapter"] / "adapter_model.safetensors")
    (files["pickleadapter"] / "adapter_model.safetensors").unlink()
    torch.save(state, files["pickleadapter"] / "adapter_model.bin")
    # An adapter missing one of its tensors.
    files["adaptermissing"] = d / "adaptermissing"
    shutil.copytree(adapter, files["adaptermissing"])
    state.pop(sorted(state)[0])
    save_file(state, files["adaptermissing"] / "adapter_model.safetensors")
    # adapter_config.json that is a list; an adapter whose base is itself.
    files["listadapter"] = d / "listadapter"
    shutil.copytree(adapter, files["listadapter"])
    (files["listadapter"] / "adapter_config.json").write_text("[1, 2]")
    files["selfadapter"] = d / "selfadapter"
    shutil.copytree(adapter, files["selfadapter"])
    (files["selfadapter"] / "adapter_config.json").write_text(json.dumps(
        dict(cfg, base_model_name_or_path=str(files["selfadapter"]))))
    # Issue 26: adapters that do not fit (a module the base lacks, a negative rank, a PEFT
    # type peft does not know, a LoRA tensor of another rank than the config's) and a base
    # of another width (--base-model).
    for name, changes in (("notargetadapter", {"target_modules": ["nosuch_proj"]}),
                          ("negrankadapter", {"r": -2}),
                          ("unknowntypeadapter", {"peft_type": "NOSUCH"}),
                          ("wrongshapeadapter", {})):
        files[name] = shutil.copytree(adapter, d / name)
        (files[name] / "adapter_config.json").write_text(json.dumps(dict(cfg, **changes)))
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state = load_file(adapter / "adapter_model.safetensors")
    save_file(dict(state, **{lora_a: torch.zeros(3, state[lora_a].shape[1])}),
              files["wrongshapeadapter"] / "adapter_model.safetensors")
    files["wideckpt"] = make_checkpoint(d / "wideckpt", hidden=64, intermediate=128)


def _checkpoint_inputs(d: Path, ckpt: Path, files: dict) -> None:
    """Checkpoints that are broken in ways only their files show."""
    from safetensors.torch import load_file

    state = load_file(ckpt / "model.safetensors")
    layer1 = "model.layers.1.self_attn.q_proj.weight"
    files["missing"] = _variant(ckpt, d / "missing", drop=[layer1])
    files["morelayers"] = _variant(ckpt, d / "morelayers", config={"num_hidden_layers": 4})
    files["hugelayers"] = _variant(ckpt, d / "hugelayers",
                                   config={"num_hidden_layers": 200_000})
    files["hugevocab"] = _variant(ckpt, d / "hugevocab", config={"vocab_size": 10**12})
    emb = "model.embed_tokens.weight"
    files["intembed"] = _variant(ckpt, d / "intembed",
                                 tensors={emb: (state[emb] * 100).to(torch.int32)})
    files["wrongshape"] = _variant(ckpt, d / "wrongshape",
                                   tensors={"model.norm.weight": torch.ones(5)})
    files["extra"] = _variant(ckpt, d / "extra", tensors={"model.extra.weight": torch.ones(3)})
    nan = state[layer1].clone()
    nan[0, 0] = float("nan")
    files["nanweights"] = _variant(ckpt, d / "nanweights", tensors={layer1: nan})
    files["sizenotint"] = _variant(ckpt, d / "sizenotint", config={"hidden_size": "wide"})
    files["listconfig"] = shutil.copytree(ckpt, d / "listconfig")
    (files["listconfig"] / "config.json").write_text("[1, 2, 3]")
    files["badindex"] = shutil.copytree(ckpt, d / "badindex")
    (files["badindex"] / "model.safetensors.index.json").write_text("{not json")
    files["escape"] = shutil.copytree(ckpt, d / "escape")
    (files["escape"] / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../ckpt/model.safetensors" for k in state}}))
    files["badtok"] = shutil.copytree(ckpt, d / "badtok")
    (files["badtok"] / "tokenizer_config.json").write_text('["not", "an", "object"]')


def _results_inputs(d: Path, files: dict) -> None:
    """relearn-attack results that are malformed in ways `report` must name."""
    good = json.loads((files["results"] / "results.json").read_text())
    for name, results, manifest in (
            ("shaperesults", dict(good, worst_case="nope"), None),
            ("listresults", [good], None),
            ("deepresults", None, None),
            ("badmanifest", good, [1, 2]),
            ("badparents", good, {"stage": "relearn-attack", "parents": "x"}),
            ("longresults", dict(good, worst_case=[{"step": i, "value": 3.0}
                                                   for i in range(200_000)]), None)):
        files[name] = d / name
        files[name].mkdir()
        text = "[" * 100_000 + "]" * 100_000 if results is None else json.dumps(results)
        (files[name] / "results.json").write_text(text)
        if manifest is not None:
            (files[name] / "undo.json").write_text(json.dumps(manifest))


def _round_three_inputs(d: Path, files: dict) -> None:
    """Issue 26's data: Python's json reads NaN and Infinity, JSON has no such text, and a
    boolean is not text (they became the strings 'nan', 'inf', 'True')."""
    files["nantext"] = d / "nantext.jsonl"
    files["nantext"].write_text('{"text": "1 + 1 = 2"}\n{"text": NaN}\n')
    files["infjson"] = d / "inf.json"
    files["infjson"].write_text('[{"text": "a \\" NaN"},\n {"text": "b"},\n {"text": -Infinity}]')
    files["trueanswer"] = _write_jsonl(d / "trueanswer.jsonl",
                                       [*PAIRS[:2], {"prompt": "1 * 2 =", "completion": True}])
    files["boolchoice"] = _write_jsonl(d / "boolchoice.jsonl", [
        {"question": "Q?", "choices": ["yes", False], "answer": 0}])
    # probe: a prompt longer than a GPT-2's 16 positions (line 5), and a model whose
    # embedding has fewer rows than its tokenizer has tokens.
    files["shortgpt2"] = make_checkpoint(d / "shortgpt2", arch="gpt2", max_position=16)
    files["longprompt"] = _write_jsonl(d / "longprompt.jsonl", [
        *PAIRS[:4], {"prompt": "1 + 1 + 1 + 1 + 1 + 1 + 1 =", "completion": " 7"}, *PAIRS[4:]])
    from safetensors.torch import load_file

    state = load_file(files["ckpt"] / "model.safetensors")
    files["smallvocab"] = _variant(files["ckpt"], d / "smallvocab", config={"vocab_size": 8},
                                   tensors={k: v[:8].clone() for k, v in state.items()
                                            if k.endswith(("embed_tokens.weight",
                                                           "lm_head.weight"))})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Iterator[dict[str, Path]]:
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
    _checkpoint_inputs(d, ckpt, files)
    _adapter_inputs(d, ckpt, files)
    _results_inputs(d, files)
    _state_inputs(d, files)
    _round_three_inputs(d, files)
    # Data that is not a file: a FIFO would block a reader forever.
    files["fifo"] = d / "fifo.jsonl"
    os.mkfifo(files["fifo"])
    files["csvextra"] = d / "extra.csv"
    files["csvextra"].write_text("text\n1 + 1 = 2\n2 + 2 = 4,surprise\n")
    files["longgate"] = "+".join(["x"] * 990) + " > 1"  # under the 2000-character limit
    # Another run holds the lock of {dir}/locked for as long as the cases run.
    files["locked"] = d / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from undo_cli.checkpoint.lock import output_lock\n"
         "with output_lock(sys.argv[1]):\n"
         "    print('ready', flush=True)\n"
         "    time.sleep(3600)\n", str(files["locked"])],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    yield files
    holder.kill()
    holder.wait()


# (id, argv, exit code, fragment of the message). `{out}` is OUT inside the case's own empty
# working directory; `{full}` is a non-empty directory there and `{file}` a file there.
CASES = [
    # ---- init
    ("init-heads-do-not-divide", ["init", "{out}", "--hidden", "30", "--heads", "4"], 2,
     "not divisible by --heads"),
    ("init-zero-heads", ["init", "{out}", "--heads", "0"], 2, "--heads"),
    ("init-unknown-arch", ["init", "{out}", "--arch", "rnn"], 2, "rnn"),
    ("init-unknown-preset", ["init", "{out}", "--preset", "huge"], 2, "huge"),
    ("init-zero-layers", ["init", "{out}", "--layers", "0"], 2, "--layers must be at least 1"),
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
    ("train-tokenizer-bpe", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                             "--tokenizer", "bpe:300", *FAST], 2,
     "--tokenizer bpe:300: train a BPE tokenizer with `undo init --tokenizer bpe:N"),
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
                                   *FAST], 2, "--trust-remote-code"),
    ("train-corrupt-safetensors", ["train", "{out}", "--init", "{corrupt}", "--data", "{text}",
                                   *FAST], 2, "truncated"),
    # ---- unlearn
    ("unlearn-unknown-method", ["unlearn", "{ckpt}", "{out}", "--method", "forgetall",
                                "--forget", "{text}", *FAST], 2, "forgetall"),
    ("unlearn-not-a-checkpoint", ["unlearn", "{notckpt}", "{out}", "--method", "ga",
                                  "--forget", "{text}", *FAST], 2, "config.json"),
    ("unlearn-config-not-json", ["unlearn", "{badconfig}", "{out}", "--method", "ga",
                                 "--forget", "{text}", *FAST], 2, "config.json"),
    ("unlearn-corrupt-safetensors", ["unlearn", "{corrupt}", "{out}", "--method", "ga",
                                     "--forget", "{text}", *FAST], 2, "truncated"),
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
    ("eval-corrupt-safetensors", ["eval", "{corrupt}", "--data", "x={pairs}"], 2,
     "truncated"),
    ("eval-remote-code-refused", ["eval", "{remote}", "--data", "x={pairs}"], 2,
     "--trust-remote-code"),
    ("eval-zero-batch", ["eval", "{ckpt}", "--data", "x={pairs}", "--batch-size", "0"], 2,
     "--batch-size"),
    # ---- report
    ("report-not-a-results-dir", ["report", "{notckpt}", "--out", "{out}"], 2, "results.json"),
    ("report-malformed-results", ["report", "{badresults}", "--out", "{out}"], 2,
     "results.json"),
    ("report-same-results-twice", ["report", "a={results}", "a={results}", "--out", "{out}"],
     2, "is given twice under label 'a'"),
    ("report-glob-matches-nothing", ["report", "a={results}-nothing-*", "--out", "{out}"], 2,
     "matches no directory"),
    ("report-output-inside-input", ["report", "{results}", "--out", "{results}/report"], 2,
     "inside input"),
    ("report-output-not-empty", ["report", "{results}", "--out", "{full}"], 2, "--overwrite"),
    # ==== issue 19: hostile and broken inputs, round two
    # ---- checkpoints that would load only in part: never run on made-up weights
    ("eval-missing-tensor", ["eval", "{missing}", "--data", "x={pairs}"], 2,
     "'model.layers.1.self_attn.q_proj.weight' is missing from model.safetensors"),
    ("train-missing-tensor", ["train", "{out}", "--init", "{missing}", "--data", "{text}",
                              *FAST], 2, "is missing from model.safetensors"),
    ("unlearn-missing-tensor", ["unlearn", "{missing}", "{out}", "--method", "ga", "--forget",
                                "{text}", *FAST], 2, "is missing from model.safetensors"),
    ("distill-student-missing-tensor", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                        "{missing}", "--data", "{text}", *FAST], 2,
     "is missing from model.safetensors"),
    ("relearn-missing-tensor", ["relearn-attack", "{missing}", "--data", "{pairs}", "--eval",
                                "forget={pairs}", "--steps", "1", "--lrs", "1e-3",
                                "--max-length", "32", "--out", "{out}"], 2, "is missing"),
    ("eval-config-declares-more-layers", ["eval", "{morelayers}", "--data", "x={pairs}"], 2,
     "declares 4 layers"),
    ("unlearn-config-declares-more-layers", ["unlearn", "{morelayers}", "{out}", "--method",
                                             "ga", "--forget", "{text}", *FAST], 2,
     "declares 4 layers"),
    ("eval-config-claims-200000-layers", ["eval", "{hugelayers}", "--data", "x={pairs}"], 2,
     "declares 200000 layers"),
    ("eval-model-cannot-fit-in-memory", ["eval", "{hugevocab}", "--data", "x={pairs}"], 2,
     "needs at least"),
    ("init-model-cannot-fit-in-memory", ["init", "{out}", "--layers", "200000", "--hidden",
                                         "8192", "--heads", "8"], 2, "needs at least"),
    ("eval-embedding-stored-as-integers", ["eval", "{intembed}", "--data", "x={pairs}"], 2,
     "'model.embed_tokens.weight' in model.safetensors is stored as I32"),
    ("unlearn-embedding-stored-as-integers", ["unlearn", "{intembed}", "{out}", "--method",
                                              "ga", "--forget", "{text}", *FAST], 2,
     "stored as I32"),
    ("eval-tensor-of-the-wrong-shape", ["eval", "{wrongshape}", "--data", "x={pairs}"], 2,
     "'model.norm.weight' in model.safetensors has shape [5]"),
    ("eval-unexpected-tensor", ["eval", "{extra}", "--data", "x={pairs}"], 2,
     "'model.extra.weight' in model.safetensors has no place"),
    ("eval-config-size-not-a-count", ["eval", "{sizenotint}", "--data", "x={pairs}"], 2,
     "'hidden_size' must be a non-negative integer"),
    ("eval-config-is-a-list", ["eval", "{listconfig}", "--data", "x={pairs}"], 2,
     "config.json: expected a JSON object"),
    ("unlearn-config-is-a-list", ["unlearn", "{listconfig}", "{out}", "--method", "ga",
                                  "--forget", "{text}", *FAST], 2, "expected a JSON object"),
    ("perturb-config-is-a-list", ["perturb", "{listconfig}", "{out}"], 2,
     "config.json: expected a JSON object"),
    ("eval-index-not-json", ["eval", "{badindex}", "--data", "x={pairs}"], 2,
     "model.safetensors.index.json: not a valid weight index"),
    ("perturb-index-not-json", ["perturb", "{badindex}", "{out}"], 2,
     "not a valid weight index"),
    ("perturb-index-points-outside", ["perturb", "{escape}", "{out}"], 2,
     "outside the checkpoint directory"),
    ("eval-index-points-outside", ["eval", "{escape}", "--data", "x={pairs}"], 2,
     "outside the checkpoint directory"),
    ("eval-tokenizer-config-is-a-list", ["eval", "{badtok}", "--data", "x={pairs}"], 2,
     "tokenizer_config.json: expected a JSON object"),
    # ---- adapters
    ("eval-pickled-adapter-refused", ["eval", "{pickleadapter}", "--data", "x={pairs}"], 2,
     "--allow-pickle"),
    ("unlearn-pickled-adapter-refused", ["unlearn", "{pickleadapter}", "{out}", "--method",
                                         "ga", "--forget", "{text}", *FAST], 2,
     "adapter_model.bin"),
    ("eval-adapter-missing-tensor", ["eval", "{adaptermissing}", "--data", "x={pairs}"], 2,
     "is missing from adapter_model.safetensors"),
    ("eval-adapter-config-is-a-list", ["eval", "{listadapter}", "--data", "x={pairs}"], 2,
     "adapter_config.json: expected a JSON object"),
    ("eval-adapter-base-is-itself", ["eval", "{selfadapter}", "--data", "x={pairs}"], 2,
     "itself an adapter"),
    ("perturb-adapter-base-is-itself", ["perturb", "{selfadapter}", "{out}"], 2,
     "itself an adapter"),
    ("eval-adapter-target-module-missing", ["eval", "{notargetadapter}", "--data",
                                            "x={pairs}"], 2,
     "the adapter does not fit its base {ckpt}: Target modules {{'nosuch_proj'}} not found"),
    ("eval-adapter-negative-rank", ["eval", "{negrankadapter}", "--data", "x={pairs}"], 2,
     "adapter_config.json: the rank r must be a positive whole number (got -2)"),
    ("eval-adapter-unknown-peft-type", ["eval", "{unknowntypeadapter}", "--data", "x={pairs}"],
     2, "adapter_config.json: unknown peft_type 'NOSUCH'"),
    ("eval-adapter-tensor-of-the-wrong-shape", ["eval", "{wrongshapeadapter}", "--data",
                                                "x={pairs}"], 2,
     "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in "
     "adapter_model.safetensors has shape [3, 32], the base {ckpt} needs [2, 32]"),
    ("unlearn-adapter-on-a-base-of-another-width", ["unlearn", "{adapter}", "{out}",
                                                    "--base-model", "{wideckpt}", "--method",
                                                    "ga", "--forget", "{text}", *FAST], 2,
     "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in "
     "adapter_model.safetensors has shape [2, 32], the base {wideckpt} needs [2, 64]"),
    # ---- --search-storage: checked when parsed, never inside an input or OUT (issue 26)
    ("relearn-search-storage-unknown-scheme", ["relearn-attack", "{ckpt}", "--data", "{pairs}",
                                               "--eval", "forget={pairs}", "--search", "2",
                                               "--search-storage", "redis://localhost/0",
                                               "--out", "{out}"], 2,
     "--search-storage 'redis://localhost/0': unknown scheme 'redis'"),
    ("relearn-search-storage-directory-missing", ["relearn-attack", "{ckpt}", "--data",
                                                  "{pairs}", "--eval", "forget={pairs}",
                                                  "--search", "2", "--search-storage",
                                                  "sqlite:///{dir}/nowhere/study.db", "--out",
                                                  "{out}"], 2,
     "--search-storage: the directory {dir}/nowhere of {dir}/nowhere/study.db does not exist"),
    ("relearn-search-storage-not-a-database", ["relearn-attack", "{ckpt}", "--data", "{pairs}",
                                               "--eval", "forget={pairs}", "--search", "2",
                                               "--search-storage", "sqlite:///{notjson}",
                                               "--out", "{out}"], 2,
     "--search-storage: {notjson} is not an SQLite database"),
    ("relearn-search-storage-is-a-directory", ["relearn-attack", "{ckpt}", "--data", "{pairs}",
                                               "--eval", "forget={pairs}", "--search", "2",
                                               "--search-storage", "sqlite:///{dir}", "--out",
                                               "{out}"], 2,
     "--search-storage: {dir} is a directory"),
    ("relearn-search-storage-inside-checkpoint", ["relearn-attack", "{ckpt}", "--data",
                                                  "{pairs}", "--eval", "forget={pairs}",
                                                  "--search", "2", "--search-storage",
                                                  "sqlite:///{ckpt}/study.db", "--out",
                                                  "{out}"], 2,
     "--search-storage {ckpt}/study.db lies inside the input {ckpt}"),
    ("relearn-search-storage-inside-output", ["relearn-attack", "{ckpt}", "--data", "{pairs}",
                                              "--eval", "forget={pairs}", "--search", "2",
                                              "--search-storage", "sqlite:///{full}/study.db",
                                              "--out", "{full}", "--overwrite"], 2,
     "--search-storage {full}/study.db lies inside the output"),
    # ---- perturb
    ("perturb-nan-weights", ["perturb", "{nanweights}", "{out}"], 2,
     "'model.layers.1.self_attn.q_proj.weight' holds NaN or infinite values"),
    ("perturb-nan-weights-copied-unchanged", ["perturb", "{nanweights}", "{out}", "--exclude",
                                              "q_proj"], 2, "--allow-nonfinite"),
    ("perturb-seed-2-to-the-70", ["perturb", "{ckpt}", "{out}", "--seed", str(2**70)], 2,
     "--seed"),
    ("perturb-alpha-nan", ["perturb", "{ckpt}", "{out}", "--alpha", "nan"], 2, "--alpha"),
    ("perturb-output-locked-by-another-run", ["perturb", "{ckpt}", "{locked}"], 2,
     "is being written by another undo run (pid"),
    ("perturb-output-name-too-long", ["perturb", "{ckpt}", "{longname}"], 2, "too long"),
    # ---- paths the command reads or writes, inside OUT or inside an input
    ("train-data-inside-output", ["train", "{full}", "--init", "tiny", "--data",
                                  "{full}/data.jsonl", "--overwrite", *FAST], 2,
     "--data {full}/data.jsonl lies inside the output"),
    ("train-eval-inside-output", ["train", "{full}", "--init", "tiny", "--data", "{text}",
                                  "--eval", "x={full}/pairs.jsonl", "--overwrite", *FAST], 2,
     "--eval {full}/pairs.jsonl lies inside the output"),
    ("train-state-dir-inside-output", ["train", "{full}", "--init", "tiny", "--data", "{text}",
                                       "--state-dir", "{full}/state", "--save-every", "1",
                                       "--overwrite", *FAST], 2,
     "--state-dir {full}/state lies inside the output"),
    ("unlearn-forget-inside-output", ["unlearn", "{ckpt}", "{full}", "--method", "ga",
                                      "--forget", "{full}/data.jsonl", "--overwrite", *FAST],
     2, "--forget"),
    ("unlearn-retain-inside-output", ["unlearn", "{ckpt}", "{full}", "--method", "graddiff",
                                      "--forget", "{text}", "--retain", "{full}/data.jsonl",
                                      "--overwrite", *FAST], 2, "--retain"),
    ("distill-cache-inside-output", ["distill", "{full}", "--teacher", "{ckpt}", "--student",
                                     "random", "--data", "{text}", "--cache-teacher",
                                     "{full}/cache", "--overwrite", *FAST], 2,
     "--cache-teacher {full}/cache lies inside the output"),
    ("distill-cache-inside-teacher", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                      "random", "--data", "{text}", "--cache-teacher",
                                      "{ckpt}/cache", *FAST], 2,
     "--cache-teacher {ckpt}/cache lies inside the input"),
    ("distill-state-dir-inside-teacher", ["distill", "{out}", "--teacher", "{ckpt}",
                                          "--student", "random", "--data", "{text}",
                                          "--state-dir", "{ckpt}/state", "--save-every", "1",
                                          *FAST], 2, "lies inside the input"),
    ("relearn-data-inside-output", ["relearn-attack", "{ckpt}", "--data", "{full}/pairs.jsonl",
                                    "--eval", "forget={pairs}", "--steps", "1", "--lrs",
                                    "1e-3", "--out", "{full}", "--overwrite"], 2,
     "lies inside the output"),
    ("init-tokenizer-inside-output", ["init", "{full}", "--tokenizer", "{full}/tokenizer.json",
                                      "--overwrite"], 2, "lies inside the output"),
    # Issue 26 item 3: every path-typed option is a declared read, checked by the option
    # generator: --overwrite never deletes an input inside OUT ({full}/base is a checkpoint).
    ("perturb-base-model-inside-output", ["perturb", "{adapter}", "{full}", "--base-model",
                                          "{full}/base", "--overwrite"], 2,
     "--base-model {full}/base lies inside the output"),
    ("train-base-model-inside-output", ["train", "{full}", "--init", "{adapter}", "--base-model",
                                        "{full}/base", "--data", "{text}", "--overwrite", *FAST],
     2, "--base-model {full}/base lies inside the output"),
    ("unlearn-base-model-inside-output", ["unlearn", "{adapter}", "{full}", "--method", "ga",
                                          "--forget", "{text}", "--base-model", "{full}/base",
                                          "--overwrite", *FAST], 2,
     "--base-model {full}/base lies inside the output"),
    ("distill-base-model-inside-output", ["distill", "{full}", "--teacher", "{adapter}",
                                          "--student", "random", "--data", "{text}",
                                          "--base-model", "{full}/base", "--overwrite", *FAST],
     2, "--base-model {full}/base lies inside the output"),
    ("relearn-base-model-inside-output", ["relearn-attack", "{adapter}", "--data", "{pairs}",
                                          "--eval", "forget={pairs}", "--steps", "1", "--lrs",
                                          "1e-3", "--base-model", "{full}/base", "--out",
                                          "{full}", "--overwrite"], 2,
     "--base-model {full}/base lies inside the output"),
    ("relearn-benign-data-inside-output", ["relearn-attack", "{ckpt}", "--benign-data",
                                           "{full}/pairs.jsonl", "--eval", "forget={pairs}",
                                           "--steps", "1", "--out", "{full}", "--overwrite"], 2,
     "--benign-data {full}/pairs.jsonl lies inside the output"),
    ("probe-data-inside-output", ["probe", "{ckpt}", "--data", "x={full}/pairs.jsonl", "--out",
                                  "{full}", "--overwrite"], 2,
     "--data {full}/pairs.jsonl lies inside the output"),
    ("probe-base-model-inside-output", ["probe", "{adapter}", "--base-model", "{full}/base",
                                        "--data", "x={pairs}", "--out", "{full}",
                                        "--overwrite"], 2,
     "--base-model {full}/base lies inside the output"),
    ("train-output-dangling-symlink", ["train", "{dangling}", "--init", "tiny", "--data",
                                       "{text}", *FAST], 2, "does not exist"),
    ("train-output-locked-by-another-run", ["train", "{locked}", "--init", "tiny", "--data",
                                            "{text}", *FAST], 2,
     "is being written by another undo run"),
    ("init-output-locked-by-another-run", ["init", "{locked}"], 2, "another undo run"),
    ("train-output-name-too-long", ["train", "{longname}", "--init", "tiny", "--data", "{text}",
                                    *FAST], 2, "too long"),
    # ---- training states that undo did not write
    ("train-resume-old-pickled-state", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                                        "--state-dir", "{oldstate}", "--resume", *FAST], 2,
     "which this version of undo did not write"),
    ("train-resume-planted-pickle", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                                     "--state-dir", "{planted}", "--resume", *FAST], 2,
     "it holds custom_checkpoint_0.pkl"),
    ("unlearn-save-beside-a-foreign-state", ["unlearn", "{ckpt}", "{out}", "--method", "ga",
                                             "--forget", "{text}", "--state-dir", "{oldstate}",
                                             "--save-every", "1", *FAST], 2,
     "did not write"),
    # ---- data that is not a file, or malformed
    ("train-fifo-as-data", ["train", "{out}", "--init", "tiny", "--data", "{fifo}", *FAST], 2,
     "not a regular file"),
    ("eval-fifo-as-data", ["eval", "{ckpt}", "--data", "x={fifo}"], 2, "not a regular file"),
    ("train-device-as-data", ["train", "{out}", "--init", "tiny", "--data", "/dev/zero",
                              *FAST], 2, "not a regular file"),
    ("train-csv-row-with-extra-fields", ["train", "{out}", "--init", "tiny", "--data",
                                         "{csvextra}", *FAST], 2,
     "extra.csv:3: the row has 2 fields, the header names 1"),
    ("train-data-weight-inf", ["train", "{out}", "--init", "tiny", "--data", "{text}:inf",
                               *FAST], 2, "positive finite"),
    ("train-data-path-with-a-newline", ["train", "{out}", "--init", "tiny", "--data",
                                        "{dir}/no\nsuch.jsonl", *FAST], 2, "no\\nsuch.jsonl"),
    # ---- numbers: finite and in range, named by their flag, at parse time
    ("train-weight-decay-inf", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                                "--weight-decay", "inf", *FAST], 2, "--weight-decay"),
    ("train-seed-2-to-the-70", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                                "--seed", str(2**70), *FAST], 2, "--seed"),
    ("train-max-flops-inf", ["train", "{out}", "--init", "tiny", "--data", "{text}",
                             "--max-flops", "inf", *FAST], 2, "--max-flops"),
    ("train-min-lr-nan", ["train", "{out}", "--init", "tiny", "--data", "{text}", "--min-lr",
                          "nan", *FAST], 2, "--min-lr"),
    ("distill-temperature-inf", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                                 "random", "--data", "{text}", "--temperature", "inf", *FAST],
     2, "--temperature"),
    ("distill-ce-weight-nan", ["distill", "{out}", "--teacher", "{ckpt}", "--student",
                               "random", "--data", "{text}", "--ce-weight", "nan", *FAST], 2,
     "--ce-weight"),
    ("relearn-threshold-nan", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--eval",
                               "forget={pairs}", "--threshold", "nan", "--out", "{out}"], 2,
     "--threshold"),
    ("relearn-lora-alpha-inf", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--eval",
                                "forget={pairs}", "--lora", "--lora-alpha", "inf", "--out",
                                "{out}"], 2, "--lora-alpha"),
    ("relearn-gate-of-990-terms", ["relearn-attack", "{ckpt}", "--data", "{pairs}", "--eval",
                                   "x={pairs}", "--fail-if", "{longgate}", "--out", "{out}"],
     2, "more than 200"),
    ("eval-gate-of-990-terms", ["eval", "{ckpt}", "--data", "x={pairs}", "--fail-if",
                                "{longgate}"], 2, "more than 200"),
    ("eval-batch-size-2-to-the-70", ["eval", "{ckpt}", "--data", "x={pairs}", "--batch-size",
                                     str(2**70)], 2, "--batch-size"),
    ("eval-negative-seed", ["eval", "{ckpt}", "--data", "x={pairs}", "--seed", "-1"], 2,
     "--seed"),
    ("init-layers-2-to-the-70", ["init", "{out}", "--layers", str(2**70)], 2, "--layers"),
    ("init-seed-2-to-the-70", ["init", "{out}", "--seed", str(2**70)], 2, "--seed"),
    ("data-train-size-10-to-the-12", ["data", "arithmetic", "{out}", "--train-size",
                                      str(10**12)], 2, "--train-size"),
    ("data-word-fraction-nan", ["data", "arithmetic", "{out}", "--word-fraction", "nan"], 2,
     "--word-fraction"),
    ("data-seed-2-to-the-70", ["data", "arithmetic", "{out}", "--seed", str(2**70)], 2,
     "--seed"),
    # ---- results and manifests of the wrong shape
    ("report-results-of-the-wrong-shape", ["report", "{shaperesults}", "--out", "{out}"], 2,
     "'worst_case' must be a list"),
    ("report-results-is-a-list", ["report", "{listresults}", "--out", "{out}"], 2,
     "a JSON list, expected an object"),
    ("report-results-nested-too-deeply", ["report", "{deepresults}", "--out", "{out}"], 2,
     "nested too deeply"),
    ("report-manifest-is-a-list", ["report", "{badmanifest}", "--out", "{out}"], 2,
     "undo.json: a manifest must be a JSON object"),
    ("report-manifest-parents-not-a-list", ["report", "{badparents}", "--out", "{out}"], 2,
     "'parents' must be a list"),
    ("report-a-curve-of-200000-points", ["report", "{longresults}", "--out", "{out}"], 2,
     "longresults/results.json: 'worst_case' has 200,000 points; undo reads at most 5,000"),
    ("relearn-compare-a-curve-of-200000-points", ["relearn-attack", "--compare",
                                                  "{longresults}", "--out", "{out}"], 2,
     "'worst_case' has 200,000 points"),
    ("relearn-compare-results-of-the-wrong-shape", ["relearn-attack", "--compare",
                                                    "{shaperesults}", "--out", "{out}"], 2,
     "'worst_case' must be a list"),
    # ---- issue 26 (round three): not JSON text, an output that is an input
    ("train-nan-as-text", ["train", "{out}", "--init", "tiny", "--data", "{nantext}", *FAST],
     2, "nantext.jsonl:2: NaN is not JSON"),
    ("train-infinity-in-a-json-list", ["train", "{out}", "--init", "tiny", "--data",
                                       "{infjson}", *FAST], 2, "inf.json:3: -Infinity is not"),
    ("eval-true-as-completion", ["eval", "{ckpt}", "--data", "x={trueanswer}"], 2,
     "trueanswer.jsonl:3: 'completion' is true, not text"),
    ("eval-false-as-a-choice", ["eval", "{ckpt}", "--data", "x={boolchoice}"], 2,
     "boolchoice.jsonl:1: 'choices' is false, not text"),
    ("relearn-true-as-completion", ["relearn-attack", "{ckpt}", "--data", "{trueanswer}",
                                    "--eval", "forget={pairs}", "--max-length", "32", "--out",
                                    "{out}"], 2, "trueanswer.jsonl:3: 'completion' is true"),
    ("probe-prompt-longer-than-the-positions", ["probe", "{shortgpt2}", "--data",
                                                "x={longprompt}"], 2,
     "longprompt.jsonl:5: the prompt is 28 tokens long, longer than the 16 positions of"),
    ("probe-tokenizer-larger-than-the-embedding", ["probe", "{smallvocab}", "--data",
                                                   "x={pairs}"], 2,
     "pairs.jsonl:1: the tokenizer of {smallvocab} gives token id"),
    ("init-gpt2-max-position-10-to-the-11", ["init", "{out}", "--arch", "gpt2",
                                            "--max-position", "100000000000"], 2,
     "--max-position 100000000000 needs at least"),
    ("init-overwrite-out-dot-dot", ["init", "{full}/..", "--overwrite"], 2,
     "give the directory by its name"),
    ("eval-log-samples-over-its-data", ["eval", "{ckpt}", "--data", "x={full}/pairs.jsonl",
                                        "--log-samples", "{full}/pairs.jsonl"], 2,
     "--log-samples {full}/pairs.jsonl would overwrite the data it scores (--data x="),
    ("eval-log-samples-through-a-symlink-to-its-data",
     ["eval", "{ckpt}", "--data", "x={full}/pairs.jsonl", "--log-samples", "{pairslink}"], 2,
     "would overwrite the data it scores"),
]


def _snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` with its contents (None for a directory, the kind of a file
    that is not a regular one, e.g. a FIFO, which must not be read)."""
    def content(p: Path) -> bytes | str | None:
        if p.is_dir():
            return None
        return p.read_bytes() if p.is_file() else "not a regular file"

    return {str(p.relative_to(root)): content(p) for p in sorted(root.rglob("*"))}


def test_the_matrix_is_large_and_covers_every_command():
    commands = {argv[0] if argv[0] != "data" else "data arithmetic" for _, argv, _, _ in CASES}
    assert commands == {"init", "data arithmetic", "train", "unlearn", "perturb", "distill",
                        "relearn-attack", "eval", "probe", "report"}
    assert len(CASES) >= 70
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cli, inputs, tmp_path, case_id, argv, code, fragment):
    work = tmp_path / "work"
    work.mkdir()
    full = work / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep me\n")
    _write_jsonl(full / "data.jsonl", [{"text": t} for t in TEXT])  # inputs inside OUT
    _write_jsonl(full / "pairs.jsonl", PAIRS)
    (full / "tokenizer.json").write_text("{}")
    shutil.copytree(inputs["ckpt"], full / "base")  # a base model inside OUT
    (full / "study.db").write_bytes(b"")  # a search study inside OUT
    (work / "file.txt").write_text("a file\n")
    (work / "dangling").symlink_to(work / "nowhere")
    (work / "pairslink.jsonl").symlink_to(full / "pairs.jsonl")
    names = {k: str(v) for k, v in inputs.items()}
    names.update(out=str(work / "out"), full=str(full), file=str(work / "file.txt"),
                 dangling=str(work / "dangling"), longname=str(work / ("x" * 240)),
                 pairslink=str(work / "pairslink.jsonl"))
    args = [a.format(**names) for a in argv]
    fragment = fragment.format(**names)
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
