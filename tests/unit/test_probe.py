"""Linear probes (`undo probe`): a planted signal is found, shuffled labels score chance."""

from __future__ import annotations

import json
import random

import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.probe import fit_probe, probe_layers


def _planted(n: int = 600, hidden: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(3, n, hidden, generator=g)  # layers -1, 0, 1
    w = torch.randn(hidden, classes, generator=g)
    labels = (states[2] @ w).argmax(-1)  # readable at layer 1 only
    return states, labels.tolist()


def test_a_planted_linear_signal_is_found_where_it_is():
    states, labels = _planted()
    result = probe_layers(states, labels, seed=0)
    assert result["layers"] == [-1, 0, 1]
    assert result["best_layer"] == 1 and result["best_accuracy"] > 0.9
    assert result["accuracy"][0] < 0.5 and result["accuracy"][1] < 0.5  # noise: near chance
    assert result["train"] == 360 and result["test"] == 240


def test_shuffled_labels_score_chance():
    states, labels = _planted()
    shuffled = list(labels)
    random.Random(1).shuffle(shuffled)
    result = probe_layers(states, shuffled, seed=0)
    assert max(result["accuracy"]) < result["baseline"] + 0.15
    assert result["above_baseline"] < 0.15


def test_the_probe_is_a_logistic_regression():
    # Separable data: the fitted probe classifies the training points themselves.
    x = torch.tensor([[0.0, 0.0], [0.1, 0.2], [3.0, 3.0], [3.1, 2.9]])
    y = torch.tensor([0, 0, 1, 1])
    predict = fit_probe(x, y, 2)
    assert predict(x).tolist() == [0, 0, 1, 1]


def test_the_probe_command(cli, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", hidden=32)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{a} * {b} = ", "answer": str(a * b)}
                                            for a in range(6) for b in range(5)])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"{a} + {a}?", "choices":
                                              [str(2 * a), str(2 * a + 1)], "answer": a % 2}
                                             for a in range(20)])
    out = tmp_path / "probe"
    r = cli("probe", ckpt, ckpt, "--data", f"qa={qa}", "--data", f"mc={mc}", "--out", out,
            "--json", "--quiet")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    first = payload["results"][0]["probes"]
    assert set(first) == {"qa", "mc"} and len(first["qa"]["accuracy"]) == 3  # emb + 2 layers
    assert first["mc"]["classes"] == 2
    assert payload["results"][0]["probes"] == payload["results"][1]["probes"]  # deterministic
    assert json.loads((out / "probe.json").read_text())["seed"] == 0
    assert (out / "undo.json").is_file()
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}] * 5)
    bad = cli("probe", ckpt, "--data", f"t={text}")
    assert bad.exit_code == 2 and "prompt/answer or multiple-choice" in bad.output
