"""Every command on checkpoints as users have them (tests/conftest.py builds them the way
transformers and peft do): an adapter whose base is a hub name, a bf16 Llama, a sharded tied
Qwen2, a GPT-2 whose maximum length is below the default --max-length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors import safe_open
from transformers import AutoModelForCausalLM


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not a dict
    return out


def _dtypes(directory: Path) -> set[torch.dtype]:
    return {t.dtype for t in _tensors(directory).values()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "text": write_jsonl(d / "text.jsonl", [{"text": f"{a} + {a} = {2 * a}"}
                                              for a in range(30)]),
        "eval": write_jsonl(d / "eval.jsonl", [{"prompt": f"{a} + 1 = ", "answer": str(a + 1)}
                                              for a in range(4)]),
    }


def _merged(adapter: Path, base: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     str(adapter)).merge_and_unload()


@pytest.mark.parametrize("command", ["train", "unlearn", "distill"])
def test_trainers_train_an_adapter_with_a_hub_base(command, cli, hub_adapter, tiny_llama, data,
                                                   tmp_path):
    """Every weight of the merged model is trained (it used to stay frozen after merging)."""
    out = tmp_path / "out"
    args = {
        "train": ["train", out, "--init", hub_adapter, "--data", data["text"]],
        "unlearn": ["unlearn", hub_adapter, out, "--method", "graddiff", "--forget",
                    data["text"], "--retain", data["text"]],
        "distill": ["distill", out, "--teacher", hub_adapter, "--student", "teacher",
                    "--alpha", "0.1", "--beta", "0.1", "--data", data["text"]],
    }[command]
    common = ["--max-steps", "2", "--max-length", "32", "--batch-size", "2", "-q"]
    refused = cli(*args, *common)
    assert refused.exit_code == 2 and "--base-model" in refused.stderr
    result = cli(*args, *common, "--base-model", tiny_llama)
    assert result.exit_code == 0, result.output
    trained = _tensors(out)
    merged = _merged(hub_adapter, tiny_llama).state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, merged[k])]
    assert len(changed) == len(trained)  # every tensor moved, none stayed frozen
    assert not (out / "README.md").exists()  # no PEFT model card on a full model
    parents = json.loads((out / "undo.json").read_text())["parents"]
    base = next(p for p in parents if p["role"].endswith("_base"))
    assert base["path"] == str(tiny_llama.resolve())


def test_eval_and_relearn_read_an_adapter_with_a_hub_base(cli, hub_adapter, tiny_llama, data,
                                                          tmp_path):
    base = ["--base-model", tiny_llama]
    ran = cli("eval", hub_adapter, "--data", f"e={data['eval']}", "--json", *base)
    assert ran.exit_code == 0, ran.output
    ran = cli("relearn-attack", hub_adapter, "--data", data["text"], "--eval",
              f"forget={data['eval']}", "--lrs", "1e-3", "--steps", "1", "--max-length", "32",
              "--out", tmp_path / "attack", "--no-plot", "-q", *base)
    assert ran.exit_code == 0, ran.output


def test_perturb_of_an_adapter_equals_perturb_of_the_merged_checkpoint(cli, hub_adapter,
                                                                       bf16_llama, tmp_path):
    """Merged in memory (in the base's dtype) and noised: the same bytes as merging it with
    peft, saving it and running `undo perturb` on that (the streamed path)."""
    merged_dir = tmp_path / "merged"
    merged = _merged(hub_adapter, bf16_llama)
    merged.save_pretrained(merged_dir)
    for f in bf16_llama.glob("tokenizer*"):
        (merged_dir / f.name).write_bytes(f.read_bytes())
    assert _dtypes(merged_dir) == {torch.bfloat16}
    noise = ["--alpha", "0.6", "--beta", "0.1", "--seed", "3", "-q"]
    for tag, extra in (("", []), ("-layer1", ["--layers", "1"])):
        assert cli("perturb", merged_dir, tmp_path / f"streamed{tag}", *noise,
                   *extra).exit_code == 0
        result = cli("perturb", hub_adapter, tmp_path / f"from-adapter{tag}", "--base-model",
                     bf16_llama, *noise, *extra)
        assert result.exit_code == 0, result.output
        got = _tensors(tmp_path / f"from-adapter{tag}")
        want = _tensors(tmp_path / f"streamed{tag}")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    merged_state = _tensors(merged_dir)
    layer0 = [k for k in merged_state if ".layers.0." in k]
    assert layer0 and all(torch.equal(got[k], merged_state[k]) for k in layer0)  # --layers 1
    parents = json.loads((tmp_path / "from-adapter" / "undo.json").read_text())["parents"]
    assert [p["role"] for p in parents] == ["input", "input_base"]


def test_dtype_and_shards_of_the_input_are_kept(cli, bf16_llama, sharded_qwen2, tiny_llama, data,
                                                tmp_path):
    common = ["--max-steps", "1", "--max-length", "32", "--batch-size", "2", "-q"]
    assert cli("unlearn", bf16_llama, tmp_path / "u", "--method", "maxent", "--forget",
               data["text"], *common).exit_code == 0
    assert _dtypes(tmp_path / "u") == {torch.bfloat16}
    assert json.loads((tmp_path / "u" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "u").dtype == torch.bfloat16
    assert cli("unlearn", bf16_llama, tmp_path / "u32", "--method", "maxent", "--forget",
               data["text"], "--save-dtype", "float32", *common).exit_code == 0
    assert _dtypes(tmp_path / "u32") == {torch.float32}

    assert cli("train", tmp_path / "q", "--init", sharded_qwen2, "--data", data["text"],
               *common).exit_code == 0
    assert (sorted(p.name for p in (tmp_path / "q").glob("*.safetensors"))
            == sorted(p.name for p in sharded_qwen2.glob("*.safetensors")))
    assert cli("distill", tmp_path / "d", "--teacher", sharded_qwen2, "--student", "random",
               "--data", data["text"], "--max-shard-size", "1GB", *common).exit_code == 0
    assert [p.name for p in (tmp_path / "d").glob("*.safetensors")] == ["model.safetensors"]

    assert cli("train", tmp_path / "t", "--init", tiny_llama, "--data", data["text"],
               "--max-shard-size", "20KB", *common).exit_code == 0
    shards = list((tmp_path / "t").glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size < 20_000 + 4096 for p in shards)
    bad = cli("train", tmp_path / "x", "--init", tiny_llama, "--data", data["text"],
              "--max-shard-size", "huge", *common)
    assert bad.exit_code == 2 and "--max-shard-size" in bad.stderr
    assert not (tmp_path / "x").exists()

    made = cli("init", tmp_path / "i", "--save-dtype", "bfloat16", "--max-shard-size", "100KB")
    assert made.exit_code == 0, made.output
    assert _dtypes(tmp_path / "i") == {torch.bfloat16}
    assert len(list((tmp_path / "i").glob("*.safetensors"))) > 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "i").dtype == torch.bfloat16


def test_models_kept_by_save_models_have_a_manifest(cli, bf16_llama, data, tmp_path):
    out = tmp_path / "attack"
    ran = cli("relearn-attack", bf16_llama, "--data", data["text"], "--eval",
              f"forget={data['eval']}", "--lrs", "1e-3,1e-2", "--steps", "2", "--eval-every", "1",
              "--max-length", "32", "--out", out, "--save-models", "--no-plot", "-q")
    assert ran.exit_code == 0, ran.output
    results = json.loads((out / "results.json").read_text())
    saved = [r for r in results["runs"] if r.get("saved_as")]
    assert len(saved) == 2
    for run in saved:
        model_dir = out / run["saved_as"]
        manifest = json.loads((model_dir / "undo.json").read_text())
        assert manifest["stage"] == "relearn-attack"
        assert manifest["parents"][0]["path"] == str(bf16_llama.resolve())
        assert manifest["relearn_run"]["lr"] == run["lr"]
        assert manifest["compute"]["tokens"] == run["tokens"] > 0
        assert _dtypes(model_dir) == {torch.bfloat16}  # the attacked model keeps CKPT's dtype


def test_max_length_defaults_to_the_models_maximum(cli, gpt2_bpe, data, tmp_path):
    """A GPT-2 with 64 positions: the default 256 becomes 64 (said once); asking for more is
    refused."""
    result = cli("train", tmp_path / "g", "--init", gpt2_bpe, "--data", data["text"],
                 "--max-steps", "1", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("--max-length 64, the model's maximum length") == 1
    manifest = json.loads((tmp_path / "g" / "undo.json").read_text())
    assert manifest["arguments"]["max_length"] == 64
    refused = cli("train", tmp_path / "h", "--init", gpt2_bpe, "--data", data["text"],
                  "--max-steps", "1", "--max-length", "128")
    assert refused.exit_code == 2 and "exceeds the model's maximum length 64" in refused.stderr
