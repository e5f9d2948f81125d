"""`undo train` end to end: pretraining from a preset, finetuning, resume, NaN guard, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from undo_cli.checkpoint import load_model, read_manifest

TEXT = [f"{a} + {b} = {a + b}" for a in range(15) for b in range(6)]
PAIRS = [{"prompt": f"{a} * 2 =", "completion": f" {2 * a}"} for a in range(20)]
FAST = ["--max-length", "32", "--batch-size", "4", "--log-every", "2", "-q", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-data")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return d


def leftovers(out: Path) -> list[str]:
    """Anything a run left beside OUT: temporaries, state directories."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
                  or p.name.startswith(f"{out.name}."))


def test_pretrain_from_a_preset(cli, data, tmp_path):
    out = tmp_path / "base"
    r = cli("train", out, "--init", "tiny", "--data", data / "text.jsonl", "--max-steps", "6",
            "--seed", "1", "--json", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    # Whole documents packed into rows: the real tokens of the 6 batches the stream gives.
    from undo_cli.data import build_stream
    from undo_cli.modelfactory import load_tokenizer_spec

    stream = build_stream(load_tokenizer_spec("char"), [str(data / "text.jsonl")], 32, 4, 1,
                          name="train")
    expected = sum(int(next(stream)["attention_mask"].sum()) for _ in range(6))
    assert 0.7 * 6 * 4 * 32 < expected <= 6 * 4 * 32  # 2 documents of 12-15 tokens a row
    assert summary["steps"] == 6 and summary["tokens"] == expected
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl",
                 "undo.json"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    assert manifest["stage"] == "train" and manifest["parents"] == []
    compute = manifest["compute"]
    assert compute["tokens"] == expected
    assert compute["flops"] == 6 * compute["parameters"] * compute["tokens"]
    assert manifest["arguments"]["preset"] == "tiny" and manifest["seed"] == 1
    assert manifest["data"]["train"][0]["shape"] == "text"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6]
    model = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == compute["parameters"]
    assert leftovers(out) == []


def test_finetune_a_checkpoint_with_mixed_data_and_eval(cli, data, tiny_llama, tmp_path):
    out = tmp_path / "ft"
    r = cli("train", out, "--init", tiny_llama, "--data", f"{data / 'text.jsonl'}:0.5",
            "--data", f"{data / 'pairs.jsonl'}:0.5", "--eval", f"pairs={data / 'pairs.jsonl'}",
            "--max-steps", "4", "--eval-every", "2", *FAST)
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert [p["role"] for p in manifest["parents"]] == ["init"]
    assert "pairs.loss" in manifest["metrics"]
    evals = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert [e["step"] for e in evals] == [2, 4]


def test_resume_after_an_interruption_gives_the_same_model(cli, data, tmp_path, monkeypatch):
    args = ["--init", "tiny", "--data", data / "text.jsonl", "--data", data / "pairs.jsonl",
            "--max-steps", "8", "--save-every", "3", *FAST]
    whole = tmp_path / "whole"
    assert cli("train", whole, *args).exit_code == 0

    import undo_cli.engine.loop as engine

    real_save = engine.save_state

    def save_then_die(accelerator, state_dir, step, key, **parts):
        real_save(accelerator, state_dir, step, key, **parts)
        if step == 6:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(engine, "save_state", save_then_die)
    r = cli("train", out, *args)
    assert r.exit_code == 130
    assert not out.exists()
    assert (tmp_path / "resumed.undo-state" / "step-00000006").is_dir()
    monkeypatch.setattr(engine, "save_state", real_save)
    r = cli("train", out, *args, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 6
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert leftovers(out) == []  # the state directory is gone after success


def test_exploding_learning_rate_stops_and_writes_nothing(cli, data, tmp_path):
    out = tmp_path / "boom"
    r = cli("train", out, "--init", "tiny", "--data", data / "text.jsonl", "--lr", "1e9",
            "--max-steps", "20", *FAST)
    assert r.exit_code == 1
    assert "diverged at step" in r.stderr and "nothing was written" in r.stderr
    assert not out.exists() and leftovers(out) == []
    kept = cli("train", out, "--init", "tiny", "--data", data / "text.jsonl", "--lr", "1e9",
               "--max-steps", "20", "--keep-last-finite", *FAST)
    assert kept.exit_code == 0
    assert read_manifest(out)["compute"]["diverged_step"] is not None


@pytest.mark.parametrize("args,message", [
    (["--init", "tiny", "--data", "missing.jsonl"], "not found"),
    (["--init", "nowhere", "--data", "{text}"], "neither a checkpoint directory nor a preset"),
    (["--init", "{ckpt}", "--data", "{text}", "--arch", "gpt2"], "apply only when --init"),
    (["--init", "tiny", "--data", "{text}", "--arch", "rnn"], "unknown architecture"),
    (["--init", "tiny", "--data", "{text}", "--schedule", "step"], "--schedule"),
    (["--init", "tiny", "--data", "{text}:-1"], "positive"),
    (["--init", "{ckpt}", "--data", "{text}", "--max-length", "4096"], "maximum length"),
    (["--init", "tiny", "--data", "{bad}"], "bad.jsonl:2:"),
])
def test_bad_arguments_are_usage_errors(cli, data, tiny_llama, tmp_path, args, message):
    (data / "bad.jsonl").write_text('{"text": "1"}\n{"prompt": "no completion"}\n')
    args = [a.format(text=data / "text.jsonl", ckpt=tiny_llama, bad=data / "bad.jsonl")
            for a in args]
    out = tmp_path / "never"
    r = cli("train", out, *args, "--max-steps", "1", "-q")
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert not out.exists() and leftovers(out) == []
