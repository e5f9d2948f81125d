"""The widened finetuning adversary: optimizers x schedules x batch sizes x learning rates, the
Optuna search, and the utility rule (`--max-retain-drop`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.data import build_stream
from undo_cli.engine.schedule import make_optimizer
from undo_cli.errors import UsageError
from undo_cli.evaluate import load_eval_set
from undo_cli.options import AttackConfig, RunSpec, TrainConfig
from undo_cli.relearn import run_attack
from undo_cli.relearn.worst_case import apply_retain_rule, worst_case_curve

RECORDS = [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a in range(6)
           for b in range(4)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    ckpt = make_checkpoint(root / "model", hidden=32, intermediate=64)
    data = write_jsonl(root / "forget.jsonl", RECORDS)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    sets = [load_eval_set("forget", data, tok, limit=8)]
    return {"root": root, "ckpt": ckpt, "data": data, "model": model, "tok": tok,
            "sets": sets}


def _stream(setup):
    return lambda seed, bs: build_stream(setup["tok"], [str(setup["data"])], 16, bs, seed,
                                         name="attack")


@pytest.mark.parametrize("kind, cls, extra", [
    ("adamw", torch.optim.AdamW, {}), ("adam", torch.optim.Adam, {}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    ("sgd-nesterov", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adagrad", torch.optim.Adagrad, {}),
])
def test_each_optimizer_is_what_it_says(kind, cls, extra):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([{"params": [p], "weight_decay": 0.0}],
                         TrainConfig(optimizer=kind, lr=0.1, max_steps=1), torch.device("cpu"))
    assert type(opt) is cls
    for key, value in extra.items():
        assert opt.param_groups[0][key] == value


def test_the_grid_is_the_product_and_every_run_is_recorded(setup):
    config = AttackConfig(lrs=[1e-3], optimizers=["adamw", "adam", "sgd", "sgd-nesterov",
                                                  "adagrad"],
                          schedules=["constant", "warmup-cosine"], batch_sizes=[2, 4],
                          steps=2, train=TrainConfig(schedule="constant", max_steps=1,
                                                     eval_every=2))
    res = run_attack(setup["model"], setup["tok"], setup["sets"], config,
                     forget_metric="forget.loss", make_stream=_stream(setup))
    combos = {(r["optimizer"], r["schedule"], r["batch_size"]) for r in res["runs"]}
    assert len(res["runs"]) == len(combos) == 5 * 2 * 2
    assert all(r["steps"] == 2 and r["curve"][-1]["step"] == 2 for r in res["runs"])
    assert len({r["config"] for r in res["runs"]}) == 20
    # batch size 4 trains on twice the tokens of batch size 2
    tokens = {r["batch_size"]: r["tokens"] for r in res["runs"] if r["optimizer"] == "adamw"}
    assert tokens[4] > tokens[2]
    # The optimizers really differ (without weight decay Adam and AdamW take the same steps).
    finals = {r["optimizer"]: r["curve"][-1]["forget.loss"] for r in res["runs"]
              if r["schedule"] == "constant" and r["batch_size"] == 4}
    assert finals["adam"] == finals["adamw"]
    assert len({finals[k] for k in ("adamw", "sgd", "sgd-nesterov", "adagrad")}) == 4
    assert len(res["per_config"]) == 20 and res["per_lr"] == res["per_config"]


def test_warmup_cosine_and_per_optimizer_grids():
    config = AttackConfig(optimizers=["adamw", "sgd"], steps=100,
                          train=TrainConfig(max_steps=1))
    run = config.run_config(RunSpec(lr=1e-3, seed=0, schedule="warmup-cosine", batch_size=4))
    assert (run.schedule, run.warmup_steps, run.batch_size, run.max_steps) == ("cosine", 10, 4,
                                                                              100)
    assert config.lr_grid("adamw")[0] == 1e-6 and config.lr_grid("sgd")[-1] == pytest.approx(0.1)
    assert len(config.grid()) == 20  # 10 learning rates per optimizer
    assert min(config.lr_grid("sgd")) > max(config.lr_grid("adamw")) / 100


def test_the_search_is_deterministic_per_seed_and_resumable(setup, tmp_path):
    pytest.importorskip("optuna")  # an optional extra (undo-cli[search])

    def search(n, storage=None, seed=0):
        config = AttackConfig(optimizers=["adamw", "sgd"], schedules=["constant", "cosine"],
                              batch_sizes=[2, 4], steps=2, search=n, search_storage=storage,
                              train=TrainConfig(schedule="constant", max_steps=1, eval_every=2,
                                                seed=seed))
        return run_attack(setup["model"], setup["tok"], setup["sets"], config,
                          forget_metric="forget.loss", make_stream=_stream(setup))

    a, b = search(4), search(4)
    assert [r["config"] for r in a["runs"]] == [r["config"] for r in b["runs"]]
    assert [r["curve"] for r in a["runs"]] == [r["curve"] for r in b["runs"]]
    assert [r["trial"] for r in a["runs"]] == [0, 1, 2, 3]
    assert [r["config"] for r in search(4, seed=1)["runs"]] != [r["config"] for r in a["runs"]]
    # The best trial is the worst case at the end (loss: the lowest).
    best = min(r["curve"][-1]["forget.loss"] for r in a["runs"])
    assert a["worst_case"][-1]["value"] == pytest.approx(best)
    assert a["summary"]["best_config"] in {r["config"] for r in a["runs"]}
    # A study kept in storage resumes: its trials are reused, new ones added.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = search(2, storage)
    resumed = search(3, storage)
    assert [r["config"] for r in resumed["runs"][:2]] == [r["config"] for r in first["runs"]]
    assert len(resumed["runs"]) == 3


def _search_config(n, storage, seed=0, steps=2):
    return AttackConfig(optimizers=["adamw", "sgd"], schedules=["constant", "cosine"],
                        batch_sizes=[2, 4], steps=steps, search=n, search_storage=storage,
                        train=TrainConfig(schedule="constant", max_steps=1, eval_every=2,
                                          seed=seed))


def test_a_resumed_search_draws_new_configurations_and_closes_stale_trials(setup, tmp_path):
    """Issue 26: the resumed session's sampler is reseeded from the finished trials, so it
    does not replay the first session's random start-up draws; a trial left running by the
    interrupted session is closed as failed."""
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def search(n):
        return run_attack(setup["model"], setup["tok"], setup["sets"],
                          _search_config(n, storage), forget_metric="forget.loss",
                          make_stream=_stream(setup), study_name="interrupted")

    first = search(2)
    stale = optuna.load_study(study_name="interrupted", storage=storage).ask()  # the kill
    resumed = search(4)
    key = [(r["config"], r["lr"]) for r in resumed["runs"]]
    assert key[:2] == [(r["config"], r["lr"]) for r in first["runs"]]
    assert len(set(key)) == 4, key  # no configuration is run twice
    trials = optuna.load_study(study_name="interrupted", storage=storage).trials
    assert trials[stale.number].state == TrialState.FAIL
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert sorted(r["trial"] for r in resumed["runs"]) == [0, 1, 3, 4]


def test_the_samplers_seed_is_one_numpy_takes_and_differs_per_resumption():
    optuna = pytest.importorskip("optuna")
    from undo_cli.relearn.search import sampler_seed

    assert sampler_seed(7, 0) == 7  # a new study: --seed itself
    seeds = {sampler_seed(seed, n) for seed in (0, 7, 2**40, 2**63 - 1) for n in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**32 for s in seeds)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(
        seed=sampler_seed(2**63 - 1, 0)))  # --seed 2**63-1 (NumPy takes seeds below 2**32)
    assert 0 <= study.ask().suggest_float("x", 0, 1) <= 1


def test_search_storage_keeps_each_attack_apart(tmp_path):
    """Issue 26: the study is keyed by everything that defines the attack, so another attack
    on the same checkpoint in the same storage (other steps, other data) runs its own
    trials; the same attack again finds its own."""
    pytest.importorskip("optuna")
    from undo_cli.options import AttackMeasurement, DataOptions, EvalOptions
    from undo_cli.relearn import relearn_checkpoint

    ckpt = make_checkpoint(tmp_path / "model", hidden=32, intermediate=64)
    data = write_jsonl(tmp_path / "forget.jsonl", RECORDS)
    other = write_jsonl(tmp_path / "other.jsonl", RECORDS[::-1][:12])
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def attack(out, n, steps, data_file):
        return relearn_checkpoint(
            ckpt, tmp_path / out, data=[str(data_file)],
            config=_search_config(n, storage, steps=steps),
            evals=EvalOptions(eval=[f"forget={data}"], eval_batch_size=8, max_new_tokens=2),
            data_options=DataOptions(max_length=16),
            measurement=AttackMeasurement(eval_limit=4, no_plot=True))

    first = attack("a", 2, 2, data)
    longer = attack("b", 1, 4, data)
    assert [r["steps"] for r in longer["runs"]] == [4]  # not the first attack's trials
    assert longer["worst_case"][-1]["step"] == 4
    elsewhere = attack("c", 1, 2, other)
    assert elsewhere["runs"][0]["config"] == first["runs"][0]["config"]  # the same draw,
    assert elsewhere["runs"][0]["curve"] != first["runs"][0]["curve"]  # other data
    again = attack("d", 2, 2, data)  # the first attack again: its trials, reused
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in first["runs"]]
    studies = {r["attack"]["search"]["study"] for r in (first, longer, elsewhere, again)}
    assert len(studies) == 3 and again["attack"]["search"]["study"] == first["attack"][
        "search"]["study"]


def test_search_without_optuna_says_how_to_install(monkeypatch):
    import builtins

    from undo_cli.relearn import search

    real = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("no optuna")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(UsageError, match=r"pip install 'undo-cli\[search\]'"):
        search._optuna()


def _run(config, values, retain):
    return {"config": config, "lr": 1e-3, "quantize": None,
            "curve": [{"step": s, "f.accuracy": v, "r.accuracy": r}
                      for s, v, r in zip((0, 10, 20), values, retain)]}


def test_the_utility_rule_excludes_runs_that_destroy_the_model():
    initial = {"f.accuracy": 0.0, "r.accuracy": 0.9}
    runs = [_run("gentle", (0.0, 0.3, 0.5), (0.9, 0.88, 0.85)),
            _run("wrecking", (0.0, 0.9, 1.0), (0.9, 0.5, 0.2))]  # forget back, retain gone
    without = worst_case_curve(runs, "f.accuracy", "max")
    assert [e["value"] for e in without] == [0.0, 0.9, 1.0]
    excluded = apply_retain_rule(runs, initial, "r.accuracy", 0.1)
    assert excluded == 2 and runs[1]["excluded_steps"] == [10, 20]
    assert runs[0]["excluded_steps"] == []
    counted = worst_case_curve(runs, "f.accuracy", "max")
    assert [e["value"] for e in counted] == [0.0, 0.3, 0.5]
    assert counted[-1]["config"] == "gentle"
    # loss-like retain metrics: worse means higher
    loss_runs = [{"config": "x", "curve": [{"step": 0, "r.loss": 1.0}, {"step": 5,
                                                                       "r.loss": 1.5}]}]
    assert apply_retain_rule(loss_runs, {"r.loss": 1.0}, "r.loss", 0.2) == 1
    nan_runs = [{"config": "x", "curve": [{"step": 5, "r.loss": math.nan}]}]
    assert apply_retain_rule(nan_runs, {"r.loss": 1.0}, "r.loss", 0.2) == 1


def test_static_attacks_hold_at_every_step():
    runs = [_run("finetune", (0.0, 0.2, 0.4), (0.9, 0.9, 0.9)),
            {"config": "few-shot k2", "static": True, "lr": None, "quantize": None,
             "curve": [{"step": 0, "f.accuracy": 0.3, "r.accuracy": 0.9}]}]
    worst = worst_case_curve(runs, "f.accuracy", "max")
    assert [(e["value"], e["config"]) for e in worst] == [
        (0.3, "few-shot k2"), (0.3, "few-shot k2"), (0.4, "finetune")]


def test_the_cli_records_the_widened_space(cli, setup, tmp_path):
    out = tmp_path / "attack"
    r = cli("relearn-attack", setup["ckpt"], "--data", setup["data"], "--eval",
            f"forget={setup['data']}", "--eval", f"retain={setup['data']}", "--eval-limit", 6,
            "--forget-metric", "forget.loss", "--optimizers", "adam,sgd", "--lrs", "1e-3",
            "--schedules", "constant,linear", "--batch-sizes", "2,4", "--steps", 2,
            "--eval-every", 2, "--max-retain-drop", "0.5", "--retain-metric", "retain.loss",
            "--max-length", 16, "--out", out, "--no-plot", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    attack = res["attack"]
    assert attack["optimizers"] == ["adam", "sgd"] and attack["schedules"] == ["constant",
                                                                                "linear"]
    assert attack["batch_sizes"] == [2, 4] and attack["max_retain_drop"] == 0.5
    assert attack["retain_metric"] == "retain.loss"
    assert len(res["runs"]) == 8 and "excluded_evaluations" in res["summary"]
    bad = cli("relearn-attack", setup["ckpt"], "--data", setup["data"], "--eval",
              f"forget={setup['data']}", "--optimizers", "adam,lion", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--optimizers must be one of" in bad.output
