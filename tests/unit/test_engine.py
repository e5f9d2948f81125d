"""The training engine: schedules, determinism, resume, NaN guard, budgets, hooks, SAM."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from undo_cli.data import build_stream, model_inputs
from undo_cli.engine import TrainConfig, latest_state, lm_loss, lr_at, remove_state, train
from undo_cli.errors import UndoError, UsageError
from undo_cli.modelfactory import ModelShape, build_config, random_model

TEXT = [f"{a} + {b} = {a + b}" for a in range(12) for b in range(5)]
PAIRS = [{"prompt": f"{a} * 3 =", "completion": f" {a * 3}"} for a in range(20)]




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return d


def make_model(tok, arch: str = "llama", seed: int = 0):
    shape = ModelShape(layers=2, hidden=32, heads=4, intermediate=64, max_position=64)
    return random_model(build_config(arch, shape, tok), seed=seed)


def streams(tok, files, batch_size: int = 4, max_length: int = 24, seed: int = 0,
            mixed: bool = True, packing: str = "documents"):
    specs = [f"{files / 'text.jsonl'}:0.6"] + ([f"{files / 'pairs.jsonl'}:0.4"] if mixed else [])
    return {"train": build_stream(tok, specs, max_length, batch_size, seed, name="train",
                                  packing=packing)}


def config(**kw) -> TrainConfig:
    base = dict(lr=3e-3, max_steps=8, log_every=2, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- schedule


def test_schedules():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, c, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c, 14) == 1.0  # decay starts at the peak
    assert lr_at(9, c, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way
    assert lr_at(14, c, 14) == pytest.approx(0.1)  # the floor
    lin = replace(c, schedule="linear")
    assert lr_at(9, lin, 14) == pytest.approx(0.55)
    assert lr_at(13, lin, 14) == pytest.approx(1.0 - 0.9 * 0.9)
    const = replace(c, schedule="constant")
    assert [lr_at(s, const, 14) for s in (3, 4, 13)] == [1.0, 1.0, 1.0]
    values = [lr_at(s, c, 14) for s in range(14)]
    assert all(c.min_lr <= v <= c.lr for v in values)


def test_config_validation():
    with pytest.raises(UsageError, match="no training budget"):
        TrainConfig().validate()
    for bad, match in [(dict(lr=0), "--lr"), (dict(schedule="step"), "--schedule"),
                       (dict(min_lr=1.0), "--min-lr"), (dict(grad_accum=0), "--grad-accum"),
                       (dict(save_every=5), "state directory"), (dict(resume=True), "state")]:
        with pytest.raises(UsageError, match=match):
            TrainConfig(max_steps=1, **bad).validate()


# ----------------------------------------------------------------------------- runs


def test_cpu_run_is_repeatable_bit_for_bit(tok, files):
    results = []
    for _ in range(2):
        model = make_model(tok)
        r = train(model, lm_loss(), streams(tok, files), config(grad_accum=2, weight_decay=0.1))
        results.append((weights(model), r))
    assert_identical(results[0][0], results[1][0])
    assert results[0][1].tokens == results[1][1].tokens
    assert results[0][1].loss == results[1][1].loss
    # and training did something
    assert not torch.equal(results[0][0]["model.embed_tokens.weight"],
                           make_model(tok).model.embed_tokens.weight)


def test_loss_goes_down(tok, files):
    model = make_model(tok)
    r = train(model, lm_loss(), streams(tok, files), config(max_steps=30, log_every=5))
    losses = [e["loss"] for e in r.log if e["type"] == "train"]
    assert losses[-1] < losses[0] - 0.5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {"grad_accum": 2}),
                                     ("llama", {"sam_rho": 0.05, "weight_decay": 0.1})])
def test_resume_equals_uninterrupted(tok, files, tmp_path, arch, kw):
    """N steps in one go == N/2 steps, an interruption, and --resume (bit for bit).

    GPT-2 has dropout, so this also checks that RNG states are restored."""
    cfg = config(max_steps=10, save_every=5, state_dir=tmp_path / "state", **kw)
    model = make_model(tok, arch)
    whole = train(model, lm_loss(), streams(tok, files), replace(cfg, save_every=None))
    expected = weights(model)

    def interrupt_after_6(m, step):
        if step == 6:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        train(make_model(tok, arch), lm_loss(), streams(tok, files), replace(cfg, eval_every=1),
              evaluate=interrupt_after_6)
    assert latest_state(cfg.state_dir).name == "step-00000005"
    model = make_model(tok, arch, seed=1)  # different weights: all must come from the state
    resumed = train(model, lm_loss(), streams(tok, files), replace(cfg, resume=True))
    assert resumed.resumed_from == 5
    assert_identical(weights(model), expected)
    assert (resumed.steps, resumed.tokens, resumed.flops) == (whole.steps, whole.tokens,
                                                              whole.flops)

    def strip(log):  # the train lines, without timings
        return [{k: v for k, v in e.items() if k not in ("tokens_per_s", "elapsed_s")}
                for e in log if e["type"] == "train"]

    assert strip(resumed.log) == strip(whole.log)
    remove_state(cfg.state_dir)
    assert not Path(cfg.state_dir).exists()


def test_resume_refuses_other_settings(tok, files, tmp_path):
    cfg = config(max_steps=4, save_every=2, state_dir=tmp_path / "s")

    def stop(m, step):
        if step == 3:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        train(make_model(tok), lm_loss(), streams(tok, files), replace(cfg, eval_every=1),
              evaluate=stop)
    with pytest.raises(UsageError, match="lr="):
        train(make_model(tok), lm_loss(), streams(tok, files),
              replace(cfg, lr=1e-4, resume=True))


def test_resume_without_state_starts_afresh(tok, files, tmp_path):
    model = make_model(tok)
    r = train(model, lm_loss(), streams(tok, files),
              config(max_steps=2, resume=True, state_dir=tmp_path / "none"))
    assert r.resumed_from is None and r.steps == 2


def test_nan_guard_fires_and_names_the_step(tok, files):
    with pytest.raises(UndoError, match=r"diverged at step \d+.*nothing was written"):
        train(make_model(tok), lm_loss(), streams(tok, files), config(lr=1e9, max_steps=20))


def test_nan_guard_can_keep_the_last_finite_weights(tok, files):
    model = make_model(tok)
    r = train(model, lm_loss(), streams(tok, files),
              config(lr=1e9, max_steps=20, keep_last_finite=True))
    assert r.diverged and r.diverged_step is not None and r.steps < 20
    assert "diverged" in r.stop_reason
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert r.log[-1]["type"] == "diverged"


@pytest.mark.parametrize("mixed", [False, True], ids=["packed-text", "text+completions"])
def test_grad_accumulation_matches_a_bigger_batch(tok, files, mixed):
    # Micro-batches hold different numbers of predicted tokens (whole documents per row,
    # completions of different lengths): every token of the step must weigh the same.
    big, small = make_model(tok), make_model(tok)
    train(big, lm_loss(), streams(tok, files, batch_size=4, mixed=mixed), config(max_steps=4))
    train(small, lm_loss(), streams(tok, files, batch_size=2, mixed=mixed),
          config(max_steps=4, grad_accum=2))
    for (k, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_token_budget_and_flop_accounting(tok, files):
    model = make_model(tok)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # text only, concatenated: exactly 4 blocks of 24 tokens per step and stream
    s = {"a": streams(tok, files, mixed=False, packing="concat")["train"],
         "b": streams(tok, files, mixed=False, seed=1, packing="concat")["train"]}

    def two_streams(m, batches):
        la = m(**model_inputs(batches["a"]), labels=batches["a"]["labels"]).loss
        lb = m(**model_inputs(batches["b"]), labels=batches["b"]["labels"]).loss
        return la + lb, {"a": la.detach(), "b": float(lb.detach())}

    r = train(model, two_streams, s, config(max_steps=None, max_tokens=1000),
              frozen_forward_params=123)
    per_step = 2 * 4 * 24
    assert r.steps == math.ceil(1000 / per_step) and r.stop_reason == "max_tokens"
    assert r.tokens == r.steps * per_step
    assert r.flops["trained"] == 6 * n_params * r.tokens
    assert r.flops["frozen"] == 2 * 123 * r.tokens
    assert r.flops["total"] == r.flops["trained"] + r.flops["frozen"]
    assert set(r.loss) == {"loss", "a", "b"}
    assert r.compute()["tokens"] == r.tokens
    # the cosine schedule knew the run's length from the token budget
    last = [e for e in r.log if e["type"] == "train"][-1]
    assert last["lr"] < 0.1 * 3e-3


def test_only_the_given_parameters_change(tok, files):
    model = make_model(tok)
    before = weights(model)
    chosen = [model.model.layers[0].mlp.down_proj.weight]
    r = train(model, lm_loss(), streams(tok, files), config(max_steps=3), parameters=chosen)
    after = weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}
    assert r.trainable_parameters == chosen[0].numel()
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_eval_hook_log_and_early_stop(tok, files, tmp_path):
    calls = []

    def evaluate(m, step):
        assert not m.training
        calls.append(step)
        return {"score": float(step)}

    log = tmp_path / "log.jsonl"
    r = train(make_model(tok), lm_loss(), streams(tok, files),
              config(max_steps=9, eval_every=4, log_path=log, eval_at_start=True),
              evaluate=evaluate, should_stop=lambda step, m: "good enough" if step >= 8 else None)
    assert calls == [0, 4, 8]
    assert r.stop_reason == "good enough" and r.steps == 8
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == r.log
    assert [e["step"] for e in lines if e["type"] == "train"] == [2, 4, 6, 8]
    assert [e["step"] for e in lines if e["type"] == "eval"] == [0, 4, 8]
    assert [e["score"] for e in r.evals] == [0.0, 4.0, 8.0]
    assert all({"lr", "loss", "grad_norm", "tokens", "flops", "tokens_per_s"} <= set(e)
               for e in lines if e["type"] == "train")


def test_frozen_parameters_charge_only_the_backward_they_need(tok, files):
    """With a subset training: forward 2P, activation backward 2P_backward (from the lowest
    trained parameter up, plus the head), weight gradients 2P_trained, per token."""
    model = make_model(tok)
    names = [n for n, _ in model.named_parameters()]
    trained = [p for n, p in model.named_parameters() if ".layers.1.mlp." in n]
    size = {n: p.numel() for n, p in model.named_parameters()}
    n_params = sum(size.values())
    n_trained = sum(p.numel() for p in trained)
    # In forward order: embeddings, layer 0, layer 1, final norm, head. Layer 1's MLP comes
    # after its attention, so the backward reaches from the head down to layer 1's MLP.
    first = names.index("model.layers.1.mlp.gate_proj.weight")
    n_backward = sum(size[n] for n in names[first:])
    assert "lm_head.weight" in names[first:]  # untied: counted in place
    r = train(model, lm_loss(), streams(tok, files, mixed=False), config(max_steps=2),
              parameters=trained)
    assert r.trainable_parameters == n_trained
    assert r.flops["trained"] == (2 * n_params + 2 * n_backward + 2 * n_trained) * r.tokens
    assert r.flops["trained"] < 6 * n_params * r.tokens
    compute = r.compute()
    assert compute["backward_parameters"] == n_backward
    assert "backward_parameters" in compute["flops_formula"]
    # Everything trains: exactly 6P as before.
    whole = train(make_model(tok), lm_loss(), streams(tok, files, mixed=False),
                  config(max_steps=2))
    assert whole.flops["trained"] == 6 * n_params * whole.tokens


def test_a_tied_head_before_the_trained_layers_is_still_charged(tok, files):
    from undo_cli.engine import backward_parameters

    model = make_model(tok, arch="gpt2")  # lm_head tied to transformer.wte (listed first)
    named = dict(model.named_parameters())
    assert "lm_head.weight" not in named
    last = [p for n, p in named.items() if n.startswith("transformer.h.1.")]
    after = list(named)[list(named).index("transformer.h.1.ln_1.weight"):]
    head = model.get_output_embeddings().weight.numel()
    assert backward_parameters(model, last) == sum(named[n].numel() for n in after) + head
    everything = sum(p.numel() for p in named.values())
    assert backward_parameters(model, list(named.values())) == everything


def test_sam_changes_the_step_and_doubles_trained_flops(tok, files):
    plain, sam = make_model(tok), make_model(tok)
    r0 = train(plain, lm_loss(), streams(tok, files), config(max_steps=3))
    r1 = train(sam, lm_loss(), streams(tok, files), config(max_steps=3, sam_rho=0.5))
    assert r1.flops["trained"] == 2 * r0.flops["trained"]
    assert not torch.equal(plain.lm_head.weight, sam.lm_head.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_training_and_resume(tok, files, tmp_path, bf16):
    cfg = config(max_steps=8, device="cuda", bf16=bf16, save_every=4,
                 state_dir=tmp_path / "state")
    model = make_model(tok)
    r = train(model, lm_loss(), streams(tok, files), replace(cfg, save_every=None))
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(r.loss["loss"]) and r.steps == 8
    expected = {k: v.float().cpu() for k, v in model.state_dict().items()}

    def stop(m, step):
        if step == 5:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        train(make_model(tok), lm_loss(), streams(tok, files), replace(cfg, eval_every=1),
              evaluate=stop)
    model = make_model(tok, seed=1)
    resumed = train(model, lm_loss(), streams(tok, files), replace(cfg, resume=True))
    assert resumed.resumed_from == 4
    for k, v in model.state_dict().items():  # CUDA kernels need not be bit-deterministic
        torch.testing.assert_close(v.float().cpu(), expected[k], rtol=1e-3, atol=1e-4)
