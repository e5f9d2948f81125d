"""Pieces of the stage skeleton: what trains (`select_parameters`) and the eval sets."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from undo_cli import stage
from undo_cli.checkpoint import load_model
from undo_cli.errors import UsageError
from undo_cli.options import EvalOptions


def test_select_parameters_by_pattern_and_layers(tiny_llama, tiny_gpt2):
    model = load_model(tiny_llama)
    every = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in stage.select_parameters(model)] == every
    mlp1 = [n for n, _ in stage.select_parameters(model, "mlp", "1")]
    assert mlp1 and all(n.startswith("model.layers.1.mlp.") for n in mlp1)
    assert set(mlp1) == {n for n in every if n.startswith("model.layers.1.mlp.")}
    gpt = [n for n, _ in stage.select_parameters(load_model(tiny_gpt2), None, "0")]
    assert gpt and all(n.startswith("transformer.h.0.") for n in gpt)
    with pytest.raises(UsageError, match="--train 'c_attn' and --train-layers '1' matches no"):
        stage.select_parameters(model, "c_attn", "1", pattern_flag="--train")
    with pytest.raises(UsageError, match="has 2 decoder layers"):
        stage.select_parameters(model, None, "2")


def test_eval_sets_take_the_choice_format(tmp_path):
    from undo_cli.modelfactory import build_char_tokenizer

    tok = build_char_tokenizer()  # with capital letters
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "2 + 2 =", "choices": ["3", "4"],
                                                 "answer": 1}])
    qa, letters = (stage.load_eval_sets(EvalOptions(eval=[f"mc={path}"], choice_format=fmt),
                                        tok)[0] for fmt in ("qa", "letters"))
    decoded = [tok.decode(s) for s in letters.sequences]
    assert all(d.endswith(("\nAnswer: A", "\nAnswer: B")) and "A. 3\nB. 4" in d
               for d in decoded)
    assert [tok.decode(s, skip_special_tokens=True) for s in qa.sequences] == [
        "Question: 2 + 2 =\nAnswer: 3", "Question: 2 + 2 =\nAnswer: 4"]
