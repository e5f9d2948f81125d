"""Attacks without finetuning: few-shot prompting and directional ablation."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.checkpoint import load_model
from undo_cli.records import EvalData, read_eval_data
from undo_cli.relearn.static import (
    FEWSHOT_DELIMITER,
    demonstrations,
    orthogonalize_,
    residual_writers,
    with_demonstrations,
)


def test_demonstrations_of_attack_records():
    records = [{"text": "3 * 4 = 12"}, {"prompt": "2 * 2 = ", "completion": "4"},
               {"prompt": "5 * 1 = ", "answer": "5"}, {"text": "  "}]
    assert demonstrations(records) == ["3 * 4 = 12", "2 * 2 = 4", "5 * 1 = 5"]


def test_the_few_shot_prompt_is_built_as_documented():
    data = EvalData(name="forget", shape="completion", source="x", records=[],
                    items=[("6 * 7 = ", "42"), ("2 * 3 = ", "6")])
    pool = ["1 * 1 = 1", "6 * 7 = 42", "2 * 5 = 10", "3 * 3 = 9"]
    shots = with_demonstrations(data, pool, 2, seed=7)
    for index, ((prompt, answer), (orig, orig_answer)) in enumerate(zip(shots.items,
                                                                        data.items)):
        assert answer == orig_answer and prompt.endswith(FEWSHOT_DELIMITER + orig)
        demos = prompt[:-len(orig)].split(FEWSHOT_DELIMITER)[:-1]
        allowed = [d for d in pool if orig.strip() not in d]
        # exactly: the demonstrations a generator seeded with (seed, set, index) draws
        assert demos == random.Random(f"7:forget:{index}").sample(allowed, 2)
        assert "6 * 7 = 42" not in demos or orig != "6 * 7 = "  # never the answer itself
    assert with_demonstrations(data, pool, 2, seed=7).items == shots.items  # deterministic
    assert with_demonstrations(data, pool, 2, seed=8).items != shots.items
    text = EvalData(name="t", shape="text", source="x", records=[], items=["abc"])
    assert with_demonstrations(text, pool, 2, seed=0) is text


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_directional_ablation_removes_a_planted_direction(tmp_path, arch):
    model = load_model(make_checkpoint(tmp_path / arch, arch=arch, hidden=32))
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    d = torch.randn(hidden, generator=g)
    d = d / d.norm()
    before = {name: m.weight.detach().clone() for name, m in residual_writers(model)}
    ids = torch.randint(4, 40, (2, 9), generator=g)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    # before: every layer's residual state has a component along d
    assert all(float((h @ d).abs().max()) > 1e-3 for h in states[:-1])
    assert orthogonalize_(model, d * 3.0) == len(before)  # any scale: the unit direction
    project = torch.eye(hidden) - torch.outer(d, d)
    for name, module in residual_writers(model):
        w, old = module.weight.detach(), before[name]
        if isinstance(module, torch.nn.Linear):
            assert float((d @ w).abs().max()) < 1e-5, name  # nothing written along d
            torch.testing.assert_close(project @ w, project @ old)  # the rest unchanged
        else:  # embeddings and GPT-2's Conv1D: rows are written vectors
            assert float((w @ d).abs().max()) < 1e-5, name
            torch.testing.assert_close(w @ project, old @ project)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    # after: no residual state (the final norm's output aside) has a component along d
    for h in states[:-1]:
        assert float((h @ d).abs().max()) < 1e-4


def test_few_shot_and_ablation_attacks_end_to_end(cli, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", hidden=32)
    forget = write_jsonl(tmp_path / "forget.jsonl",
                         [{"prompt": f"{a} * {b} = ", "answer": str(a * b)} for a in range(5)
                          for b in range(4)])
    retain = write_jsonl(tmp_path / "retain.jsonl",
                         [{"prompt": f"{a} + {b} = ", "answer": str(a + b)} for a in range(5)
                          for b in range(4)])
    out = tmp_path / "attack"
    r = cli("relearn-attack", ckpt, "--data", forget, "--eval", f"forget={forget}", "--eval",
            f"retain={retain}", "--forget-metric", "forget.loss", "--no-finetune",
            "--few-shot", 2, "--seeds", 2, "--ablate-direction", "--out", out, "--no-plot",
            "--save-models", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    kinds = [r["attack"] for r in res["runs"]]
    assert kinds.count("few-shot") == 2 and kinds.count("ablate-direction") == 2  # 2 layers
    assert all(r["static"] and r["steps"] == 0 for r in res["runs"])
    assert res["attack"]["few_shot"] == 2 and res["attack"]["ablate_direction"] is True
    best = min(r["curve"][0]["forget.loss"] for r in res["runs"])
    assert res["summary"]["final"] == pytest.approx(min(best, res["initial"]["forget.loss"]))
    saved = [r for r in res["runs"] if r["attack"] == "ablate-direction"][0]["saved_as"]
    load_model(out / saved)  # a plain checkpoint
    # a few-shot prompt really is longer: its loss differs from the zero-shot one
    shots = [r for r in res["runs"] if r["attack"] == "few-shot"][0]
    assert shots["curve"][0]["forget.loss"] != res["initial"]["forget.loss"]
    assert read_eval_data("f", forget).items[0][0] == "0 * 0 = "
