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


# ------------------------------------------------------------------ plans


def _no_weights(monkeypatch):
    """Make any weight load fail: a plan must be decided from configs alone."""
    import undo_cli.distill.run as distill_run
    import undo_cli.training as training
    import undo_cli.unlearn as unlearn

    def refuse(*args, **kwargs):
        raise AssertionError("a plan loaded weights")

    for module in (training, unlearn, distill_run):
        monkeypatch.setattr(module, "load_model", refuse)


def test_plans_are_complete_and_frozen_before_any_weight_loads(tiny_llama, tmp_path,
                                                               monkeypatch):
    import dataclasses

    from undo_cli.distill import plan_distill
    from undo_cli.engine import count_parameters
    from undo_cli.options import NoiseOptions, TrainConfig
    from undo_cli.unlearn import default_lr as unlearn_lr
    from undo_cli.unlearn import get_method, plan_unlearn

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1+1=2"}] * 4)
    loaded = count_parameters(load_model(tiny_llama))
    _no_weights(monkeypatch)
    plan = plan_unlearn(tiny_llama, tmp_path / "u", "rmu", [str(data)], [str(data)])
    # the lr by the model's size, as the loaded model's parameter count decides it
    assert plan.config.lr == unlearn_lr(get_method("rmu"), loaded)
    assert plan.config.max_steps == get_method("rmu").max_steps
    assert plan.data_options.max_length == 128  # the model's positions (default is larger)
    assert plan.arguments["layer"] == 0  # a 2-layer model: min(7, 2 // 2 - 1)
    assert plan.arguments["trainable"].endswith(r"\.(0)\.mlp\.(down_proj|c_proj|dense_4h_to_h)"
                                                r"\.weight$")
    assert plan.arguments["retain_weight"] == 1200.0
    assert plan.arguments["train"]["lr"] == plan.config.lr  # undo.json records it as decided
    assert plan.memory is not None and plan.memory.trainable < loaded
    assert plan.config.state_dir == tmp_path / "u.undo-state"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config = TrainConfig()  # type: ignore[misc]

    distill = plan_distill(tiny_llama, "teacher", tmp_path / "d", data=[str(data)],
                           noise=NoiseOptions(alpha=0.5, beta=0.1, layers="1"))
    selection, plan = distill.selection, distill.stage
    assert selection.noise["noised"] and all(n.startswith("model.layers.1.")
                                             for n in selection.noise["noised"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        distill.selection = None  # type: ignore[misc]
    assert plan.config.max_steps is not None and plan.config.lr is not None
    assert not (tmp_path / "u").exists() and not (tmp_path / "d").exists()


def test_a_plan_refuses_a_selection_matching_nothing_before_loading(tiny_llama, tmp_path,
                                                                    monkeypatch):
    from undo_cli.options import UnlearnOptions
    from undo_cli.unlearn import plan_unlearn

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1+1=2"}] * 4)
    _no_weights(monkeypatch)
    with pytest.raises(UsageError, match="--trainable 'zzz' matches no parameter"):
        plan_unlearn(tiny_llama, tmp_path / "u", "maxent", [str(data)],
                     options=UnlearnOptions(trainable="zzz"))
    with pytest.raises(UsageError, match="--layer 5: the model has 2 layers"):
        plan_unlearn(tiny_llama, tmp_path / "u", "rmu", [str(data)], [str(data)],
                     options=UnlearnOptions(layer=5))


def test_undo_json_records_the_plan_as_run(tiny_llama, tmp_path):
    import json

    from undo_cli.options import TrainConfig
    from undo_cli.unlearn import plan_unlearn, unlearn_checkpoint

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1+1=2"}] * 4)
    config = TrainConfig(max_steps=2, batch_size=2, lr=None)
    plan = plan_unlearn(tiny_llama, tmp_path / "u", "maxent", [str(data)], train_config=config)
    unlearn_checkpoint(tiny_llama, tmp_path / "u", "maxent", [str(data)], train_config=config)
    manifest = json.loads((tmp_path / "u" / "undo.json").read_text())
    assert manifest["arguments"]["train"] == json.loads(json.dumps(plan.arguments["train"]))
    assert manifest["memory_plan"]["trainable"] == plan.memory.trainable


def test_the_attack_plan_clips_the_lora_rank_before_any_weight_loads(tiny_llama, tmp_path,
                                                                     monkeypatch):
    import torch

    import undo_cli.relearn.results as results
    from undo_cli.checkpoint.plan import lora_parameters
    from undo_cli.options import AttackConfig
    from undo_cli.relearn.plan import plan_attack

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "12*3=36"}] * 8)
    monkeypatch.setattr(results.checkpoint_io, "load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    config = AttackConfig(lora=True, lora_rank=512, steps=2, lrs=[1e-3], seeds=1)
    plan = plan_attack(tiny_llama, tmp_path / "r", data=[str(data)], config=config,
                       evals=EvalOptions(eval=[f"forget={data}"]))
    # Independently: the narrowest side of every linear map LoRA wraps (the head excluded).
    model = load_model(tiny_llama)
    narrowest = min(min(m.weight.shape) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert plan.lora_rank == narrowest < 512
    expected = lora_parameters(plan.info.config, narrowest)
    assert plan.memory.trainable == expected  # the plan counts the rank the run uses
    assert not (tmp_path / "r").exists()
