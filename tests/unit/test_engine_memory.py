"""`--gradient-checkpointing`, `--bf16-weights` and the optimizers (`undo_cli.engine.memory`,
`undo_cli.engine.schedule`): checkpointing changes neither the loss nor the gradients (full
training, LoRA, `--train-layers`, the hidden-state loss), and it really recomputes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from undo_cli.data import build_stream
from undo_cli.engine import TrainConfig, lm_loss, train
from undo_cli.engine.memory import enable_checkpointing, is_checkpointing
from undo_cli.errors import UsageError
from undo_cli.modelfactory import ModelShape, build_config, random_model

TEXT = [f"{a} + {b} = {a + b}" for a in range(12) for b in range(5)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return path


def make_model(tok, arch: str = "llama", seed: int = 0):
    shape = ModelShape(layers=3, hidden=32, heads=4, intermediate=64, max_position=64)
    return random_model(build_config(arch, shape, tok), seed=seed)


def batch_of(tok, data, seed: int = 0) -> dict:
    return next(build_stream(tok, [str(data)], 24, 4, seed, name="train"))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "max_steps": 3, "log_every": 1, "seed": 0,
                          "device": "cpu", **kw})


class Recomputations:
    """Counts the runs of a decoder layer's MLP: `calls` all of them, `recomputed` those of
    the backward pass (module hooks do not fire there: transformers checkpoints `forward`)."""

    def __init__(self, layer: torch.nn.Module):
        self.calls = self.hooked = 0
        forward = layer.mlp.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
        layer.mlp.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.hooked += 1

    @property
    def recomputed(self) -> int:
        return self.calls - self.hooked


def loss_and_grads(model, loss_fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (GPT-2): checkpointing replays them
    loss, _ = loss_fn(model, {"train": batch})
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(loss.detach()), grads


def assert_same(plain, checkpointed) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = plain, checkpointed
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def checked(model, layer, loss_fn, batch):
    """(loss, grads) without and with checkpointing; asserts that it recomputed."""
    plain = loss_and_grads(model, loss_fn, batch)
    counter = Recomputations(layer)
    disable = enable_checkpointing(model)
    assert is_checkpointing(model)
    result = loss_and_grads(model, loss_fn, batch)
    assert (counter.calls, counter.recomputed) == (2, 1)  # forward, again in the backward
    disable()
    assert not is_checkpointing(model)
    return plain, result


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_training_same_loss_and_gradients(tok, data, arch):
    model = make_model(tok, arch)
    layer = model.model.layers[1] if arch == "llama" else model.transformer.h[1]
    assert_same(*checked(model, layer, lm_loss(), batch_of(tok, data)))


def test_train_layers_same_loss_and_gradients(tok, data):
    from undo_cli.stage import select_parameters

    model = make_model(tok)
    chosen = {n for n, _ in select_parameters(model, layers="2", layers_flag="--train-layers")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    plain, result = checked(model, model.model.layers[2], lm_loss(), batch_of(tok, data))
    assert set(plain[1]) == chosen
    assert_same(plain, result)


def test_lora_same_loss_and_gradients(tok, data):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(make_model(tok), LoraConfig(r=4, lora_alpha=8,
                                                       target_modules="all-linear"))
    for name, p in model.named_parameters():  # a non-zero B: gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    layer = model.get_base_model().model.layers[1]
    plain, result = checked(model, layer, lm_loss(), batch_of(tok, data))
    assert all("lora_" in n for n in plain[1]) and any("lora_A" in n for n in plain[1])
    assert_same(plain, result)


def test_hidden_state_loss_same_loss_and_gradients(tok, data):
    from undo_cli.distill import kd_loss_fn

    student = make_model(tok, seed=1)
    teacher = make_model(tok, seed=2).eval()
    loss_fn = kd_loss_fn(teacher, hidden_weight=0.5, hidden_layers=[0, 1, 2], chunk_size=7)
    assert_same(*checked(student, student.model.layers[0], loss_fn, batch_of(tok, data)))


def test_engine_run_with_checkpointing_equals_one_without(tok, data):
    results = []
    for flag in (False, True):
        model = make_model(tok)
        stream = {"train": build_stream(tok, [str(data)], 24, 4, 0, name="train")}
        r = train(model, lm_loss(), stream, config(gradient_checkpointing=flag))
        results.append((r, {k: v.clone() for k, v in model.state_dict().items()}))
        assert not is_checkpointing(model)  # turned off after the run
    (a, wa), (b, wb) = results
    assert [e["loss"] for e in a.log if e["type"] == "train"] == pytest.approx(
        [e["loss"] for e in b.log if e["type"] == "train"], rel=1e-5)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lora_with_checkpointing_trains(tok, data):
    """The LoRA + checkpointing combination that silently trained nothing elsewhere: here the
    adapter's weights move (and only they)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(make_model(tok), LoraConfig(r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counter = Recomputations(model.get_base_model().model.layers[0])
    stream = {"train": build_stream(tok, [str(data)], 24, 4, 0, name="train")}
    r = train(model, lm_loss(), stream, config(gradient_checkpointing=True, lr=1e-2))
    assert counter.recomputed == r.steps
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_bf16_weights_train_in_bf16(tok, data):
    model = make_model(tok)
    stream = {"train": build_stream(tok, [str(data)], 24, 4, 0, name="train")}
    r = train(model, lm_loss(), stream, config(bf16_weights=True, max_steps=2))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert r.steps == 2 and all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_adafactor_trains_and_differs_from_adamw(tok, data):
    finals = {}
    for name in ("adamw", "adafactor"):
        model = make_model(tok)
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        stream = {"train": build_stream(tok, [str(data)], 24, 4, 0, name="train")}
        train(model, lm_loss(), stream, config(optimizer=name, max_steps=2))
        finals[name] = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        assert not torch.equal(before, finals[name])
    assert not torch.equal(finals["adamw"], finals["adafactor"])


def test_eight_bit_optimizers_are_refused_without_bitsandbytes_or_cuda(monkeypatch):
    import importlib.util

    from undo_cli.runtime import require_optimizers

    require_optimizers(["adamw", "adafactor"], "cpu")  # nothing to refuse
    for name in ("adamw8bit", "paged_adamw8bit"):
        with pytest.raises(UsageError, match=f"--optimizer {name} needs a CUDA device"):
            require_optimizers([name], "cpu")  # bitsandbytes installed or not: no CUDA here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UsageError, match="needs bitsandbytes, which is not installed"):
        require_optimizers(["adamw8bit"], "cpu")


def test_checkpointing_refused_for_a_model_without_it():
    with pytest.raises(UsageError, match="does not support gradient checkpointing"):
        enable_checkpointing(copy.deepcopy(torch.nn.Linear(2, 2)))
