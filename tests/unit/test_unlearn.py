"""Unlearning methods: registry, method losses on a real model, and end-to-end runs.

The end-to-end tests use a tiny Llama that the session fixture first trains (with the engine)
on two disjoint toy tasks until it knows both:

- retain: runs of the alphabet ("klmnopq..."), forget: runs of the digits ("7890123...").

Forget and retain performance are the cross-entropy (nats per predicted token) on held-out
runs, computed directly here. The trained model starts near 0 on both. Each method must
raise forget CE to at least FORGET_MIN while retain CE stays below RETAIN_MAX (the bound
this file states): about 60x the starting loss, still far below the ~3.3 nats of guessing
uniformly among the 26 letters.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from undo_cli import losses, unlearn
from undo_cli.checkpoint import load_model, load_tokenizer, read_manifest
from undo_cli.engine import TrainConfig
from undo_cli.errors import UndoError, UsageError
from undo_cli.options import DataOptions

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
RUN = 24  # characters of a held-out run
DOC = 64  # characters of a training document (longer than a block: EOS is rare)
# Long documents: the toy trains and unlearns on concatenated blocks (--packing concat).
PACKING = "concat"
DATA = DataOptions(max_length=32, packing=PACKING)
FORGET_MIN = 1.0  # forget CE after unlearning: at least this (it starts near 0.01)
RETAIN_MAX = 0.5  # retain CE after unlearning: at most this (it starts near 0.01)


def _runs(alphabet: str, n: int, seed: int, length: int = RUN) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(len(alphabet))
        out.append("".join(alphabet[(start + i) % len(alphabet)] for i in range(length)))
    return out


def _write_text(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def held_out_ce(model, tokenizer, alphabet: str) -> float:
    """CE of `model` on held-out runs of `alphabet` (independent of the engine and evaluate)."""
    batch = _batch(tokenizer, _runs(alphabet, 32, seed=12345))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return losses.token_cross_entropy(logits, batch["labels"]).item()


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny Llama trained on both toy tasks, and its forget / retain training files."""
    from undo_cli.checkpoint import atomic_output, save_model
    from undo_cli.data import build_stream
    from undo_cli.engine import lm_loss, train

    root = tmp_path_factory.mktemp("unlearn")
    forget = _write_text(root / "forget.jsonl", _runs(DIGITS, 100, seed=1, length=DOC))
    retain = _write_text(root / "retain.jsonl", _runs(LETTERS, 100, seed=2, length=DOC))
    base = make_checkpoint(root / "random", hidden=32, intermediate=64)
    model, tok = load_model(base), load_tokenizer(base)
    stream = build_stream(tok, [f"{forget}:1", f"{retain}:1"], 32, 16, seed=0, name="train",
                          packing=PACKING)
    train(model, lm_loss("train"), {"train": stream},
          TrainConfig(lr=1e-2, max_steps=100, warmup_steps=10, seed=0))
    trained = root / "trained"
    with atomic_output(trained) as tmp:
        save_model(model, tok, tmp, source=base)
    return {"model": trained, "forget": forget, "retain": retain, "root": root}


def _config(**kw) -> TrainConfig:
    base = dict(lr=1e-3, max_steps=30, batch_size=8, seed=0, log_every=5,
                schedule="constant")
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# Registry and method losses
# --------------------------------------------------------------------------------------------


def test_registry_has_every_method_with_a_formula():
    assert {"maxent", "graddiff", "ga", "npo", "rmu"} <= set(unlearn.METHODS)
    for name, method in unlearn.METHODS.items():
        assert method.name == name and method.formula
        assert method.fn.__doc__ and "L =" in method.fn.__doc__
    with pytest.raises(UsageError, match="unknown unlearning method"):
        unlearn.get_method("nope")


def test_register_method_adds_a_method_in_one_line():
    @unlearn.register_method("_test_double_ce", formula="2 * CE(forget)")
    def double(model, batches, ctx):
        """L = 2 * CE(forget)."""
        b = batches["forget"]
        return 2 * losses.token_cross_entropy(ctx.forward(model, "forget", b).logits,
                                              b["labels"]), {}

    try:
        assert unlearn.get_method("_test_double_ce").fn is double
        with pytest.raises(ValueError, match="twice"):
            unlearn.register_method("_test_double_ce", formula="x")(double)
    finally:
        del unlearn.METHODS["_test_double_ce"]


@pytest.fixture(scope="module")
def small(tiny_llama):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    model.eval()  # no dropout: the direct computations below must see the same function
    forget = _batch(tok, _runs(DIGITS, 3, seed=5))
    forget["labels"][0, :4] = losses.IGNORE_INDEX  # a masked prompt
    retain = _batch(tok, _runs(LETTERS, 3, seed=6))
    return model, {"forget": forget, "retain": retain}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("method", ["maxent", "graddiff", "ga", "npo", "rmu"])
def test_method_loss_equals_its_formula(small, method):
    model, batches = small
    f, r = batches["forget"], batches["retain"]
    has_retain = method != "ga"
    used = batches if has_retain else {"forget": f}
    opts = unlearn.UnlearnOptions(retain_weight=0.7, beta=0.5, layer=0, steering_coeff=3.0)
    setup = unlearn.prepare_method(model, method, opts, has_retain=has_retain)
    loss, terms = setup.loss_fn(model, used)
    lf, lr_ = _logits(model, f), _logits(model, r)
    ce_f = losses.token_cross_entropy(lf, f["labels"])
    ce_r = losses.token_cross_entropy(lr_, r["labels"])
    if method == "maxent":
        expected = losses.maxent_kl(lf, f["labels"]) + 0.7 * ce_r
    elif method == "graddiff":
        expected = -ce_f + 0.7 * ce_r
    elif method == "ga":
        expected = -ce_f
    elif method == "npo":
        # The model is its own reference here: log-ratio 0, loss (2/beta) log 2 per sequence.
        expected = torch.tensor(2 / 0.5 * math.log(2)) + 0.7 * ce_r
    else:
        with torch.no_grad():
            h = model(input_ids=f["input_ids"], output_hidden_states=True).hidden_states[1]
        u = unlearn.steering_vector(h.shape[-1], 3.0, seed=0)
        kept = f["labels"] != losses.IGNORE_INDEX
        expected = ((h - u) ** 2).mean(-1)[kept].mean()  # retain MSE is 0 at the start
        assert terms["retain_mse"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.as_tensor(v).dim() == 0 for v in terms.values())


def test_rmu_defaults_and_trainable_selection(tiny_llama):
    model = load_model(tiny_llama)  # 2 layers
    setup = unlearn.prepare_method(model, "rmu", unlearn.UnlearnOptions(), has_retain=True)
    assert setup.context.layer == 0
    assert setup.context.retain_weight == 1200.0
    assert setup.trainable_names == ["model.layers.0.mlp.down_proj.weight"]
    assert setup.context.steering.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert setup.reference_parameters > 0
    # Without retain data RMU needs no frozen copy.
    alone = unlearn.prepare_method(model, "rmu", unlearn.UnlearnOptions(), has_retain=False)
    assert alone.context.reference is None and alone.reference_parameters == 0
    # --trainable overrides; a regex matching nothing is refused.
    mine = unlearn.prepare_method(model, "rmu", unlearn.UnlearnOptions(trainable=r"mlp\."),
                                  has_retain=True)
    assert len(mine.trainable_names) == 6  # gate, up, down of two layers
    with pytest.raises(UsageError, match="matches no parameter"):
        unlearn.prepare_method(model, "maxent", unlearn.UnlearnOptions(trainable="zzz"),
                               has_retain=True)
    with pytest.raises(UsageError, match="--layer 5"):
        unlearn.prepare_method(model, "rmu", unlearn.UnlearnOptions(layer=5), has_retain=True)
    # The paper's layer on deep models, a lower one on small ones.
    for layers, expected in ((2, 0), (6, 2), (12, 5), (32, 7)):
        model.config.num_hidden_layers = layers
        assert unlearn.default_rmu_layer(model) == expected
    model.config.num_hidden_layers = 2


def test_gpt2_rmu_trains_its_mlp_projection(tiny_gpt2):
    model = load_model(tiny_gpt2)
    setup = unlearn.prepare_method(model, "rmu", unlearn.UnlearnOptions(), has_retain=False)
    assert setup.trainable_names == ["transformer.h.0.mlp.c_proj.weight"]


def test_default_learning_rate_depends_on_model_size():
    for name in ("maxent", "graddiff", "ga", "npo"):
        method = unlearn.get_method(name)
        assert unlearn.default_lr(method, 500_000) == 1e-3
        assert unlearn.default_lr(method, 100_000_000) == 5e-5
    rmu = unlearn.get_method("rmu")
    assert unlearn.default_lr(rmu, 500_000) == 1e-2
    assert unlearn.default_lr(rmu, 7_000_000_000) == 5e-5


def test_steering_vector_is_a_seeded_scaled_unit_vector():
    a = unlearn.steering_vector(16, 2.0, seed=3)
    assert a.norm().item() == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(a, unlearn.steering_vector(16, 2.0, seed=3))
    assert not torch.equal(a, unlearn.steering_vector(16, 2.0, seed=4))


def test_option_validation():
    ga = unlearn.get_method("ga")
    with pytest.raises(UsageError, match="no retain term"):
        unlearn.check_retain(ga, has_retain=True)
    unlearn.check_retain(unlearn.get_method("npo"), has_retain=True)
    # An invalid group cannot be built: each value is checked (and a pattern compiled) there.
    for bad, flag in ((dict(beta=0.0), "--beta"), (dict(retain_weight=-1.0), "--retain-weight"),
                      (dict(layer=-1), "--layer"), (dict(repnoise_beta=-1.0), "--repnoise-beta"),
                      (dict(trainable="("), "--trainable")):
        with pytest.raises(UsageError, match=flag):
            unlearn.UnlearnOptions(**bad)
    assert unlearn.UnlearnOptions(trainable="mlp").trainable.regex.search("x.mlp.y")


def test_repnoise_adds_its_term(small):
    model, batches = small
    plain = unlearn.prepare_method(model, "graddiff", unlearn.UnlearnOptions(), has_retain=True)
    noisy = unlearn.prepare_method(model, "graddiff", unlearn.UnlearnOptions(repnoise=True),
                                   has_retain=True)
    base, _ = plain.loss_fn(model, batches)
    torch.manual_seed(0)
    total, terms = noisy.loss_fn(model, batches)
    assert total.item() == pytest.approx(base.item() + terms["repnoise"].item(), rel=1e-5)
    f = batches["forget"]
    ce = losses.token_cross_entropy(_logits(model, f), f["labels"])
    # The ascent part alone is -log(1 + CE); the MMD part is >= 0 and weighted 0.001.
    assert terms["repnoise"].item() >= -math.log1p(ce.item()) - 1e-6
    assert terms["repnoise"].item() <= -math.log1p(ce.item()) + 1e-3 * 10


def test_reference_results_are_reused_under_sam(small):
    model, batches = small
    setup = unlearn.prepare_method(model, "npo", unlearn.UnlearnOptions(), has_retain=True)
    calls = []
    ref = setup.context.reference
    handle = ref.register_forward_hook(lambda *a: calls.append(1))
    try:
        setup.loss_fn(model, batches)
        setup.loss_fn(model, batches)  # SAM's second evaluation of the same batches
        assert len(calls) == 1
        other = {k: {n: t.clone() for n, t in b.items()} for k, b in batches.items()}
        setup.loss_fn(model, other)
        assert len(calls) == 2
    finally:
        handle.remove()


def test_frozen_forward_params_counts_only_the_reference_stream():
    class S:
        def __init__(self, n):
            self.n = n

        def tokens_per_batch(self):
            return self.n

    setup = unlearn.MethodSetup(method=unlearn.get_method("npo"), context=None, loss_fn=None,
                                parameters=[], trainable_names=[], trainable_pattern=None,
                                reference_parameters=1000)
    assert setup.frozen_forward_params({"forget": S(100), "retain": S(300)}) == 250
    assert setup.frozen_forward_params({"forget": S(100)}) == 1000


# --------------------------------------------------------------------------------------------
# End to end on the trained toy model
# --------------------------------------------------------------------------------------------

# Settings for the toy model: (training config, method options). RMU trains one 32x64 matrix
# here, and its paper retain weight (1200) pins the shared layer so hard that it needs many
# more steps on a 2-layer model; 100 lets it forget within the budget of this file.
E2E = {
    "maxent": (dict(lr=2e-3, max_steps=15), {}),
    "graddiff": (dict(lr=1e-3, max_steps=15), {}),
    "ga": (dict(lr=1e-3, max_steps=10), {}),
    "npo": (dict(lr=2e-3, max_steps=15), {}),
    "rmu": (dict(lr=1e-2, max_steps=30), dict(retain_weight=100.0)),
}


def test_toy_model_knows_both_tasks(toy):
    model, tok = load_model(toy["model"]), load_tokenizer(toy["model"])
    assert held_out_ce(model, tok, DIGITS) < 0.1
    assert held_out_ce(model, tok, LETTERS) < 0.1


@pytest.mark.parametrize("method", sorted(E2E))
def test_each_method_forgets_and_keeps_retain(toy, tmp_path, method):
    out = tmp_path / "out"
    retain = [] if method == "ga" else [str(toy["retain"])]
    train_kw, option_kw = E2E[method]
    summary = unlearn.unlearn_checkpoint(
        toy["model"], out, method, [str(toy["forget"])], retain,
        unlearn.UnlearnOptions(**option_kw), _config(**train_kw), data_options=DATA)
    model, tok = load_model(out), load_tokenizer(out)
    forget_ce, retain_ce = held_out_ce(model, tok, DIGITS), held_out_ce(model, tok, LETTERS)
    assert forget_ce >= FORGET_MIN, (method, forget_ce, retain_ce)
    assert retain_ce <= RETAIN_MAX, (method, forget_ce, retain_ce)
    manifest = read_manifest(out)
    assert manifest["stage"] == "unlearn"
    assert manifest["arguments"]["method"] == method
    assert manifest["parents"][0]["role"] == "input"
    assert manifest["compute"]["steps"] == summary["steps"] == train_kw["max_steps"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(e["type"] == "train" for e in log)


def test_repnoise_and_sam_modifiers_run_end_to_end(toy, tmp_path):
    out = tmp_path / "out"
    unlearn.unlearn_checkpoint(
        toy["model"], out, "maxent", [str(toy["forget"])], [str(toy["retain"])],
        unlearn.UnlearnOptions(repnoise=True), _config(lr=2e-3, max_steps=15, sam_rho=0.05),
        data_options=DATA)
    model, tok = load_model(out), load_tokenizer(out)
    assert held_out_ce(model, tok, DIGITS) >= FORGET_MIN
    assert held_out_ce(model, tok, LETTERS) <= RETAIN_MAX
    manifest = read_manifest(out)
    assert manifest["arguments"]["options"]["repnoise"] is True
    assert manifest["arguments"]["train"]["sam_rho"] == 0.05


def test_resume_equals_an_uninterrupted_run(toy, tmp_path, monkeypatch):
    import undo_cli.engine.loop as engine

    forget, retain = [str(toy["forget"])], [str(toy["retain"])]
    # NPO (a frozen reference) with RepNoise (random noise: the RNG state must be restored).
    opts = unlearn.UnlearnOptions(repnoise=True)
    cfg = _config(max_steps=8, schedule="cosine")
    unlearn.unlearn_checkpoint(toy["model"], tmp_path / "full", "npo", forget, retain, opts, cfg,
                               data_options=DATA)

    class Interrupt(Exception):
        pass

    real_save = engine.save_state

    def save_then_stop(accelerator, state_dir, step, *args, **kwargs):
        real_save(accelerator, state_dir, step, *args, **kwargs)
        if step == 4:
            raise Interrupt

    # First attempt: stopped right after the state of step 4 was saved; no output is left.
    state = tmp_path / "state"
    monkeypatch.setattr(engine, "save_state", save_then_stop)
    with pytest.raises(Interrupt):
        unlearn.unlearn_checkpoint(toy["model"], tmp_path / "resumed", "npo", forget, retain,
                                   opts, replace(cfg, state_dir=state, save_every=4),
                                   data_options=DATA)
    monkeypatch.setattr(engine, "save_state", real_save)
    assert not (tmp_path / "resumed").exists()
    summary = unlearn.unlearn_checkpoint(
        toy["model"], tmp_path / "resumed", "npo", forget, retain, opts,
        replace(cfg, state_dir=state, save_every=4, resume=True), data_options=DATA)
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "resumed")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    full_log = (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert len(full_log) == len(resumed_log)
    assert not state.exists()  # the state is removed once the output is written


def test_nan_guard_fires_and_leaves_no_output(toy, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UndoError, match="diverged"):
        unlearn.unlearn_checkpoint(
            toy["model"], out, "graddiff", [str(toy["forget"])], [str(toy["retain"])],
            unlearn.UnlearnOptions(), _config(lr=1e12, max_grad_norm=None, max_steps=20),
            data_options=DATA)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_arguments_fail_before_any_work(toy, tmp_path):
    with pytest.raises(UsageError, match="no retain term"):
        unlearn.unlearn_checkpoint(toy["model"], tmp_path / "o", "ga", [str(toy["forget"])],
                                   [str(toy["retain"])], unlearn.UnlearnOptions(), _config())
    with pytest.raises(UsageError, match="no forget data"):
        unlearn.unlearn_checkpoint(toy["model"], tmp_path / "o", "maxent", [], [],
                                   unlearn.UnlearnOptions(), _config())
    with pytest.raises(UsageError, match="unknown unlearning method"):
        unlearn.unlearn_checkpoint(toy["model"], tmp_path / "o", "bogus", [str(toy["forget"])])
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_help_shows_every_formula(cli):
    result = cli("unlearn", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for method in unlearn.METHODS.values():
        assert f"{method.name}: L = {' '.join(method.formula.split())}" in text


def test_cli_run_writes_a_checkpoint_with_manifest_and_log(cli, toy, tmp_path):
    out = tmp_path / "out"
    held_out = _write_text(tmp_path / "digits.jsonl", _runs(DIGITS, 4, seed=99))
    result = cli("unlearn", toy["model"], out, "--method", "npo", "--forget", toy["forget"],
                 "--retain", toy["retain"], "--max-steps", "3", "--max-length", "32",
                 "--batch-size", "4", "--sam", "0.01", "--eval", f"digits={held_out}",
                 "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3 and summary["lr"] == 1e-3  # tiny model: tiny-model lr
    assert {p.name for p in out.iterdir()} >= {"undo.json", "train_log.jsonl", "config.json",
                                               "model.safetensors", "tokenizer.json"}
    manifest = read_manifest(out)
    assert manifest["arguments"]["train"]["sam_rho"] == 0.01
    assert manifest["arguments"]["options"]["beta"] == 0.1
    assert manifest["compute"]["frozen_forward_params"] > 0
    assert manifest["metrics"]["digits.loss"] == summary["metrics"]["digits.loss"]
    assert not (tmp_path / "out.undo-state").exists()


def test_cli_refuses_bad_arguments(cli, toy, tmp_path):
    out = tmp_path / "out"
    bad = [
        ("--method", "nope"),
        ("--method", "ga", "--retain", str(toy["retain"])),
        ("--method", "npo", "--beta", "0"),
        ("--method", "rmu", "--layer", "9"),
        ("--method", "maxent", "--sam", "-1"),
    ]
    for args in bad:
        result = cli("unlearn", toy["model"], out, "--forget", toy["forget"], "--max-steps",
                     "1", "--max-length", "32", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output
    assert not out.exists()
