"""The whole chain on a tiny random model of every architecture `undo init` offers: unlearn ->
perturb (`--layers`) -> distill (`--train-layers`, hidden-state loss, checkpointing) ->
relearn-attack (full with `--ablate-direction`, LoRA) -> eval. Module names differ by
architecture (`model.layers.N`, `transformer.h.N`, `gpt_neox.layers.N`; `qkv_proj`,
`query_key_value`; `lm_head`, `embed_out`): each step must find them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TEST_ALPHABET, write_jsonl
from safetensors import safe_open

from undo_cli.modelfactory import ARCHITECTURES

ALPHABET = TEST_ALPHABET.encode("unicode_escape").decode()
SIZE = ("--layers", "2", "--hidden", "32", "--heads", "4", "--intermediate", "64",
        "--max-position", "64", "--tokenizer", f"char:{ALPHABET}")
TRAIN = ("--max-steps", "2", "--batch-size", "2", "--max-length", "32", "-q")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "forget": write_jsonl(d / "forget.jsonl", [{"text": f"{a} * {a} = {a * a}"}
                                                  for a in range(20)]),
        "retain": write_jsonl(d / "retain.jsonl", [{"text": f"{a} + {a} = {2 * a}"}
                                                  for a in range(20)]),
        "forget_eval": write_jsonl(d / "fe.jsonl", [{"prompt": f"{a} * {a} = ",
                                                     "answer": str(a * a)} for a in range(4)]),
        "retain_eval": write_jsonl(d / "re.jsonl", [{"prompt": f"{a} + {a} = ",
                                                     "answer": str(2 * a)} for a in range(4)]),
    }


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_whole_chain_on_every_architecture(cli, data, tmp_path, arch):
    base, unlearned, noised = tmp_path / "base", tmp_path / "unlearned", tmp_path / "noised"
    student = tmp_path / "student"
    evals = ("--eval", f"forget={data['forget_eval']}", "--eval", f"retain={data['retain_eval']}")

    ran = cli("init", base, "--arch", arch, *SIZE)
    assert ran.exit_code == 0, ran.output
    assert json.loads((base / "config.json").read_text())["model_type"] == arch

    ran = cli("unlearn", base, unlearned, "--method", "maxent", "--forget", data["forget"],
              "--retain", data["retain"], "--lr", "1e-2", *TRAIN)
    assert ran.exit_code == 0, ran.output

    ran = cli("perturb", unlearned, noised, "--alpha", "0.5", "--beta", "0.1", "--layers", "1",
              "-q")
    assert ran.exit_code == 0, ran.output
    before, after = _tensors(unlearned), _tensors(noised)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".1." in k for k in changed)  # only decoder layer 1
    assert not any(".0." in k for k in changed)

    ran = cli("distill", student, "--teacher", unlearned, "--student", noised,
              "--data", data["retain"], "--train-layers", "1", "--hidden-loss-weight", "0.5",
              "--gradient-checkpointing", *TRAIN)
    assert ran.exit_code == 0, ran.output
    before, after = _tensors(noised), _tensors(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".1." in k for k in changed)  # --train-layers 1 only

    for mode in (("--ablate-direction",), ("--lora", "--lora-rank", "4")):
        out = tmp_path / f"attack{len(mode)}"
        ran = cli("relearn-attack", student, "--data", data["forget"], *evals,
                  "--lrs", "1e-3", "--steps", "2", "--eval-every", "2", "--max-length", "32",
                  "--batch-size", "2", *mode, "--out", out, "--no-plot", "-q")
        assert ran.exit_code == 0, ran.output
        results = json.loads((out / "results.json").read_text())
        kinds = {r.get("attack") for r in results["runs"]}
        modes = {r.get("mode") for r in results["runs"] if not r.get("static")}
        if mode[0] == "--lora":
            assert modes == {"lora"}
        else:
            assert modes == {"full"} and "ablate-direction" in kinds

    ran = cli("eval", student, "--data", f"forget={data['forget_eval']}", "--data",
              f"retain={data['retain_eval']}", "--json")
    assert ran.exit_code == 0, ran.output
    metrics = json.loads(ran.stdout)["results"][0]["metrics"]
    assert {"forget", "retain"} <= set(metrics)
    assert all(0 <= metrics[s]["accuracy"] <= 1 for s in ("forget", "retain"))


@pytest.mark.parametrize("arch", ["mistral", "gpt_neox", "phi3"])
def test_rmu_default_trainable_and_layer_ranges_find_the_modules(tok, arch):
    """RMU's default trainable MLP down-projections (GPT-NeoX: dense_4h_to_h) and
    `--train-layers` resolve on the new architectures."""
    import re

    from undo_cli.modelfactory import ModelShape, build_config, random_model
    from undo_cli.options import UnlearnOptions
    from undo_cli.stage import select_parameters
    from undo_cli.unlearn import _rmu_trainable

    model = random_model(build_config(arch, ModelShape(2, 32, 4, 64, 64), tok))
    regex = re.compile(_rmu_trainable(model, UnlearnOptions()))
    down = "dense_4h_to_h" if arch == "gpt_neox" else "down_proj"
    assert [n for n, _ in model.named_parameters() if regex.search(n)] == [
        f"{'gpt_neox' if arch == 'gpt_neox' else 'model'}.layers.0.mlp.{down}.weight"]
    chosen = [n for n, _ in select_parameters(model, layers="1")]
    assert chosen and all(".layers.1." in n for n in chosen)
