"""`undo relearn-attack`: the attack grid, the worst case, no leaks, LoRA, quantisation, gates.

The module fixture builds "a model that knows a toy task and was unlearned": a tiny Llama
(hidden 32) is trained with `undo train` on two prompt/completion tasks until it answers
both perfectly (retain: continue a run of letters, "klm" -> "nopq"; forget: the same with
digits, "345" -> "6789"), then `undo unlearn --method maxent` suppresses the digits
(forget accuracy 0, retain accuracy stays 1). Attacks use 2-3 learning rates and <= 20
steps, so the whole file runs in seconds on an idle machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from typer.testing import CliRunner

from undo_cli import relearn
from undo_cli.checkpoint import fingerprint, load_model, load_tokenizer, read_manifest
from undo_cli.data import build_stream
from undo_cli.engine import TrainConfig
from undo_cli.errors import UsageError
from undo_cli.evaluate import load_eval_set
from undo_cli.gates import attack_gate_names
from undo_cli.options import (
    PAPER_LRS,
    AttackConfig,
    AttackMeasurement,
    DataOptions,
    EvalOptions,
    parse_lrs,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: far faster than two on a busy 2-core machine (results do not
    depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(alphabet: str, prompt: int = 3, completion: int = 4) -> list[dict]:
    out = []
    for start in range(len(alphabet)):
        run = "".join(alphabet[(start + i) % len(alphabet)] for i in range(prompt + completion))
        out.append({"prompt": run[:prompt], "completion": run[prompt:]})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invoke(*args):
    from undo_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Trained (knows both tasks) and unlearned (forgot the digits) tiny models + files."""
    root = tmp_path_factory.mktemp("relearn")
    forget = _write(root / "forget.jsonl", _records(DIGITS))
    retain = _write(root / "retain.jsonl", _records(LETTERS))
    text = _write(root / "text.jsonl", [{"text": "0123456789"}, {"text": "abcdefg"}])
    base = make_checkpoint(root / "random", hidden=32, intermediate=64)
    evals = ["--eval", f"forget={forget}", "--eval", f"retain={retain}"]
    r = _invoke("train", root / "trained", "--init", base, "--data", f"{forget}:1",
                "--data", f"{retain}:1", "--lr", "1e-2", "--max-steps", 60, "--warmup-steps", 5,
                "--batch-size", 16, "--max-length", 16, "--quiet", "--json", *evals)
    assert r.exit_code == 0, r.output
    trained = json.loads(r.stdout)["metrics"]
    assert trained["forget.accuracy"] == 1.0 and trained["retain.accuracy"] == 1.0
    r = _invoke("unlearn", root / "trained", root / "unlearned", "--method", "maxent",
                "--forget", forget, "--retain", retain, "--lr", "1e-3", "--max-steps", 20,
                "--batch-size", 16, "--max-length", 16, "--quiet", "--json", *evals)
    assert r.exit_code == 0, r.output
    unlearned = json.loads(r.stdout)["metrics"]
    assert unlearned["forget.accuracy"] <= 0.1 and unlearned["retain.accuracy"] >= 0.9
    return {"root": root, "forget": forget, "retain": retain, "text": text,
            "trained": root / "trained", "unlearned": root / "unlearned", "evals": evals}


def _attack(toy, out, *extra, lrs="1e-3,1e-2", steps=20, every=5):
    return _invoke("relearn-attack", toy["unlearned"], "--data", toy["forget"], *toy["evals"],
                   "--out", out, "--lrs", lrs, "--steps", steps, "--eval-every", every,
                   "--max-length", 16, "--batch-size", 8, *extra)


def _seed_means(runs, metric, quantized=False):
    """step -> lr -> mean over seeds, computed directly from the per-run curves."""
    values: dict[int, dict[float, list[float]]] = {}
    for run in runs:
        if bool(run["quantize"]) != quantized:
            continue
        for entry in run["curve"]:
            if entry.get(metric) is not None:
                values.setdefault(entry["step"], {}).setdefault(run["lr"], []).append(
                    entry[metric])
    return {s: {lr: sum(v) / len(v) for lr, v in g.items()} for s, g in values.items()}


# --------------------------------------------------------------------------------------------
# The attack end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(toy):
    """One CLI attack: 2 learning rates x 2 seeds, 20 steps, evaluation every 5."""
    out = toy["root"] / "attack"
    r = _attack(toy, out, "--seeds", 2, "--threshold", 0.5, "--json")
    assert r.exit_code == 0, r.output
    return {"out": out, "stdout": r.stdout, "stderr": r.stderr,
            "results": json.loads((out / "results.json").read_text())}


def test_attack_brings_the_forget_metric_back(grid, toy):
    res = grid["results"]
    for key in ("checkpoint", "fingerprint", "forget_metric", "direction", "attack", "initial",
                "runs", "worst_case", "summary"):
        assert key in res
    assert res["checkpoint"] == str(toy["unlearned"])
    assert res["fingerprint"] == fingerprint(toy["unlearned"])
    assert res["forget_metric"] == "forget.accuracy" and res["direction"] == "max"
    attack = res["attack"]
    assert attack["mode"] == "full" and attack["lrs"] == [1e-3, 1e-2]
    assert attack["steps"] == 20 and attack["eval_every"] == 5 and attack["seeds"] == [0, 1]
    assert attack["batch_size"] == 8 and attack["data"] == [str(toy["forget"])]
    assert res["initial"]["forget.accuracy"] <= 0.1
    assert res["initial"]["retain.accuracy"] >= 0.9
    assert len(res["runs"]) == 4
    for run in res["runs"]:
        assert [e["step"] for e in run["curve"]] == [0, 5, 10, 15, 20]
        assert run["curve"][0] == {"step": 0, **res["initial"]}  # shared step-0 evaluation
        assert run["diverged"] is False and run["diverged_step"] is None
    s = res["summary"]
    assert s["initial"] == res["initial"]["forget.accuracy"]
    assert s["final"] >= 0.8 > s["initial"] + 0.5  # relearned
    assert s["final_step"] == 20 and s["best_lr"] in (1e-3, 1e-2)
    assert s["threshold"] == 0.5 and s["steps_to_threshold"] in (5, 10, 15, 20)
    assert set(s["retain_at_threshold"]) == {"retain.loss", "retain.accuracy"}
    # --json prints the same document; undo.json records the stage and the parent
    assert json.loads(grid["stdout"]) == res
    manifest = read_manifest(grid["out"])
    assert manifest["stage"] == "relearn-attack"
    assert manifest["parents"][0]["role"] == "input"
    assert manifest["parents"][0]["fingerprint"] == res["fingerprint"]
    assert (grid["out"] / "relearn.png").stat().st_size > 1000


def test_worst_case_is_the_pointwise_best_over_learning_rates(grid):
    res = grid["results"]
    means = _seed_means(res["runs"], "forget.accuracy")
    worst = res["worst_case"]
    assert [e["step"] for e in worst] == sorted(means)
    for entry in worst:
        by_lr = means[entry["step"]]
        assert entry["value"] == pytest.approx(max(by_lr.values()))
        if entry["step"] == 0:
            assert entry["lr"] is None  # the unattacked model
        else:
            assert by_lr[entry["lr"]] == pytest.approx(entry["value"])
    # AUC: trapezoid area divided by the span; steps to threshold: first step reaching it
    pts = [(e["step"], e["value"]) for e in worst]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    assert res["summary"]["auc"] == pytest.approx(area / (pts[-1][0] - pts[0][0]))
    first = next(e for e in worst if e["value"] >= 0.5)
    assert res["summary"]["steps_to_threshold"] == first["step"]
    assert res["summary"]["final"] == worst[-1]["value"]


def test_progress_summary_and_quiet(grid, toy):
    assert "run 4/4" in grid["stderr"] and "worst case: forget.accuracy" in grid["stderr"]
    r = _attack(toy, toy["root"] / "quiet", "--quiet", lrs="1e-2", steps=2, every=1)
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout == ""


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_runs_do_not_leak_and_the_model_is_loaded_once(toy, monkeypatch, mode):
    """A repeated (lr, seed) run after another learning rate gives the identical curve (for
    LoRA: the adapter's random init comes from the run's seed, not from whatever ran before);
    the in-memory original is unchanged; the checkpoint is read from disk once."""
    import undo_cli.checkpoint as checkpoint

    loads = []
    real = checkpoint.load_model

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model", counting)
    config = AttackConfig(lrs=[1e-3, 1e-2, 1e-3], steps=10, lora=mode == "lora", lora_rank=4,
                          train=TrainConfig(schedule="constant", max_steps=1, batch_size=8,
                                            eval_every=5))
    torch.rand(100)  # whatever ran before in this process must not matter
    res = relearn.relearn_checkpoint(
        toy["unlearned"], toy["root"] / f"leak-{mode}", data=[str(toy["forget"])],
        evals=EvalOptions(eval=[f"forget={toy['forget']}", f"retain={toy['retain']}"]),
        config=config, data_options=DataOptions(max_length=16),
        measurement=AttackMeasurement(no_plot=True))
    assert len(loads) == 1
    first, middle, repeat = res["runs"]
    assert first["lr"] == repeat["lr"] and first["seed"] == repeat["seed"]
    assert first["curve"] == repeat["curve"]  # bit-identical metrics
    assert first["train_loss"] == repeat["train_loss"]
    assert middle["curve"] != first["curve"]


def test_the_original_in_memory_model_is_untouched(toy):
    model, tok = load_model(toy["unlearned"]), load_tokenizer(toy["unlearned"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sets = [load_eval_set("forget", toy["forget"], tok)]
    config = AttackConfig(lrs=[1e-2], steps=5,
                          train=TrainConfig(schedule="constant", max_steps=1, batch_size=8,
                                            eval_every=5))
    seen = []
    relearn.run_attack(model, tok, sets, config, forget_metric="forget.accuracy",
                       make_stream=lambda seed, bs: build_stream(
                           tok, [str(toy["forget"])], 16, bs, seed, name="attack"),
                       on_model=lambda run, m: seen.append(m))
    assert seen and seen[0] is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = any(not torch.equal(v, before[k]) for k, v in seen[0].state_dict().items())
    assert changed  # the copy was trained


def test_lora_attack_trains_an_adapter_and_leaves_base_weights(toy):
    model, tok = load_model(toy["unlearned"]), load_tokenizer(toy["unlearned"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sets = [load_eval_set("forget", toy["forget"], tok)]
    config = AttackConfig(lrs=[1e-2], steps=10, lora=True,
                          train=TrainConfig(schedule="constant", max_steps=1, batch_size=8,
                                            eval_every=5))
    attacked = []
    res = relearn.run_attack(model, tok, sets, config, forget_metric="forget.accuracy",
                             make_stream=lambda seed, bs: build_stream(
                                 tok, [str(toy["forget"])], 16, bs, seed, name="attack"),
                             on_model=lambda run, m: attacked.append(m))
    assert res["lora_rank"] == 32  # 128 clipped to the hidden width of the tiny model
    peft_model = attacked[0]
    assert hasattr(peft_model, "peft_config")
    run = res["runs"][0]
    # alpha defaults to 2 x the rank used (not a fixed 256: rank 32 would scale by 8)
    assert run["lora_rank"] == 32 and run["lora_alpha"] == 64.0
    assert peft_model.peft_config["default"].lora_alpha == 64.0
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert run["trainable_parameters"] == sum(
        p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert any("q_proj" in n for n in lora_names) and any("down_proj" in n for n in lora_names)
    assert not any("lm_head" in n for n in lora_names)
    # base weights inside the adapter model are the original ones; so is the original model
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, before[key]), name
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert run["curve"][-1]["forget.loss"] < res["initial"]["forget.loss"] - 0.5


def test_lora_attack_cli_saves_adapters(toy):
    out = toy["root"] / "lora"
    r = _attack(toy, out, "--lora", "--lora-rank", 4, "--save-models", "--json", "--quiet",
                lrs="1e-2", steps=5)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["attack"]["mode"] == "lora"
    assert res["attack"]["lora"] == {"rank": 4, "rank_requested": 4, "alpha": 8.0,
                                     "alpha_requested": None, "targets": "all-linear",
                                     "dropout": 0.0}
    assert res["runs"][0]["lora_rank"] == 4 and res["runs"][0]["lora_alpha"] == 8.0
    saved = out / res["runs"][0]["saved_as"]
    assert json.loads((saved / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    assert (saved / "undo.json").is_file()
    merged = load_model(saved)  # the adapter loads on top of CKPT
    assert sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for p in load_model(toy["unlearned"]).parameters())


def test_lora_alpha_given_is_used_whatever_the_rank():
    config = AttackConfig(lora=True, lora_rank=8, lora_alpha=4.0)
    assert config.alpha_for(8) == config.alpha_for(2) == 4.0
    assert AttackConfig(lora=True).alpha_for(8) == 16.0
    assert AttackConfig(lora=True).alpha_for(None) is None
    assert [s.lora_alpha for s in config.grid(8)] == [4.0] * len(config.grid(8))
    assert {s.lora_alpha for s in AttackConfig(lora=True).grid(32)} == {64.0}


def test_models_are_not_written_by_default(grid):
    assert not (grid["out"] / "models").exists()
    assert all("saved_as" not in run for run in grid["results"]["runs"])


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--lrs", ","], "--lrs is empty"),
    (["--lrs", "1e-3,abc"], "not a number"),
    (["--lrs", "1e-3,-1e-3"], "must be positive"),
    (["--lrs", "1e-3,1e-3"], "twice"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-5"], "--steps must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--forget-metric", "forget.acc"], "available: forget.loss, forget.accuracy"),
    (["--forget-metric", "forget.n"], "a count"),
    (["--forget-metric", "text.accuracy"], "set 'text' gives loss, ppl"),
    (["--fail-if", "worst.forget.accuracy >"], "--fail-if"),
    (["--fail-if", "worst.forget.acc > 0.5"], "unknown name"),
    (["--fail-if", "steps_to_threshold < 5"], "unknown name"),
    (["--group-size", "4"], "--group-size needs --quantize"),
    (["--quantize", "3"], "--quantize must be 8 or 4"),
])
def test_bad_inputs_exit_2_before_any_work(toy, monkeypatch, extra, message):
    import undo_cli.checkpoint as checkpoint

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    out = toy["root"] / "bad"
    r = _invoke("relearn-attack", toy["unlearned"], "--data", toy["forget"], *toy["evals"],
                "--eval", f"text={toy['text']}", "--out", out, "--max-length", 16, *extra)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert not out.exists()


def test_missing_pieces_are_named(toy):
    out = toy["root"] / "missing"
    r = _invoke("relearn-attack", toy["unlearned"], "--data", toy["forget"], "--out", out)
    assert r.exit_code == 2 and "--eval" in r.stderr
    r = _invoke("relearn-attack", toy["unlearned"], *toy["evals"], "--out", out)
    assert r.exit_code == 2 and "--data" in r.stderr
    r = _invoke("relearn-attack", "--data", toy["forget"], *toy["evals"], "--out", out)
    assert r.exit_code == 2 and "CKPT" in r.stderr
    r = _invoke("relearn-attack", toy["unlearned"], "--data", toy["forget"], "--eval",
                f"retain={toy['retain']}", "--out", out, "--max-length", 16)
    assert r.exit_code == 2 and "--forget-metric" in r.stderr
    assert not out.exists()


def test_library_validation():
    with pytest.raises(UsageError, match="empty"):
        AttackConfig(lrs=[]).validate()
    with pytest.raises(UsageError, match="--steps"):
        AttackConfig(steps=0).validate()
    with pytest.raises(UsageError, match="--lrs must be a finite number"):
        AttackConfig(lrs=[float("nan")]).validate()
    with pytest.raises(UsageError, match="--lrs must be greater than 0"):
        AttackConfig(lrs=[-1e-3]).validate()
    assert parse_lrs(None) == list(PAPER_LRS)
    with pytest.raises(UsageError, match="twice"):
        parse_lrs("1e-3,1e-3")
    assert len(PAPER_LRS) == 10
    assert PAPER_LRS[0] == 1e-6 and PAPER_LRS[-1] == 1e-3
    ratios = [b / a for a, b in zip(PAPER_LRS, PAPER_LRS[1:])]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced
    assert relearn.metric_direction("x.loss") == "min"
    assert relearn.metric_direction("x.accuracy_norm") == "max"


# --------------------------------------------------------------------------------------------
# Worst case, divergence and summaries (pure functions)
# --------------------------------------------------------------------------------------------


def _run(lr, seed, points, diverged_step=None):
    return {"lr": lr, "seed": seed, "quantize": None, "diverged": diverged_step is not None,
            "diverged_step": diverged_step,
            "curve": [{"step": s, "f.loss": v, "r.loss": 1.0 + v} for s, v in points]}


def test_worst_case_averages_seeds_first_and_skips_diverged_steps():
    runs = [
        _run(1e-4, 0, [(0, 5.0), (10, 4.0), (20, 3.0)]),
        _run(1e-4, 1, [(0, 5.0), (10, 2.0), (20, 1.0)]),  # lr 1e-4: means 3.0, 2.0
        _run(1e-3, 0, [(0, 5.0), (10, 1.5)], diverged_step=12),  # broken after step 10
        _run(1e-3, 1, [(0, 5.0), (10, 3.5), (20, 2.5)]),  # lr 1e-3 means: 2.5, then 2.5
    ]
    worst = relearn.worst_case_curve(runs, "f.loss", "min")
    assert worst == [{"step": 0, "value": 5.0, "lr": None, "config": None},
                     {"step": 10, "value": 2.5, "lr": 1e-3, "config": "lr0.001"},
                     {"step": 20, "value": 2.0, "lr": 1e-4, "config": "lr0.0001"}]
    s = relearn.summarize(runs, worst, "f.loss", "min", {"f.loss": 5.0, "r.loss": 6.0},
                          threshold=2.5)
    assert s["final"] == 2.0 and s["best_lr"] == 1e-4 and s["final_step"] == 20
    assert s["auc"] == pytest.approx(((5.0 + 2.5) * 10 / 2 + (2.5 + 2.0) * 10 / 2) / 20)
    assert s["steps_to_threshold"] == 10
    assert s["retain_at_threshold"] == {"r.loss": pytest.approx(3.5)}  # lr 1e-3 at step 10
    table = relearn.per_config_table(runs, "f.loss", "min")
    assert table[1]["diverged_runs"] == 1 and table[1]["final"] == 2.5
    never = relearn.summarize(runs, worst, "f.loss", "min", {"f.loss": 5.0}, threshold=0.1)
    assert never["steps_to_threshold"] is None and never["retain_at_threshold"] is None
    assert relearn.area_under_curve([(0, 0.3)]) == 0.3
    assert relearn.area_under_curve([]) is None


def test_a_diverging_run_is_kept_with_its_earlier_evaluations(toy):
    out = toy["root"] / "diverge"
    r = _attack(toy, out, "--json", "--quiet", "--max-grad-norm", 0, lrs="1e-3,1e30", steps=10)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    normal, broken = res["runs"]
    assert normal["diverged"] is False
    assert broken["diverged"] is True and 1 <= broken["diverged_step"] <= 10
    assert all(e["step"] < broken["diverged_step"] for e in broken["curve"])
    for entry in res["worst_case"]:
        if entry["step"] >= broken["diverged_step"]:
            assert entry["lr"] == 1e-3
    assert res["summary"]["final_step"] == 10


# --------------------------------------------------------------------------------------------
# Quantisation attack and gates
# --------------------------------------------------------------------------------------------


def test_quantize_only_attack(toy):
    out = toy["root"] / "q8"
    before = fingerprint(toy["unlearned"])
    r = _invoke("relearn-attack", toy["unlearned"], *toy["evals"], "--out", out,
                "--quantize", 8, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["attack"]["mode"] == "none"
    assert res["attack"]["quantize"] == {"bits": 8, "group_size": None}
    (run,) = res["runs"]
    assert run["lr"] is None and run["quantize"]["bits"] == 8 and run["quantize"]["layers"] > 0
    assert [e["step"] for e in run["curve"]] == [0]
    (point,) = res["worst_case"]
    assert {k: point[k] for k in ("step", "value", "lr", "config", "quantized")} == {
        "step": 0, "value": run["curve"][0]["forget.accuracy"], "lr": None,
        "config": "original", "quantized": True}
    # One evaluation of the 10 forget items: the band resamples them, the items are kept.
    assert point["lower"] <= point["value"] <= point["upper"]
    assert len(point["items"]["num"]) == 10
    assert sum(point["items"]["num"]) / 10 == pytest.approx(point["value"])
    # 8 bits barely change this model
    assert run["curve"][0]["retain.accuracy"] == res["initial"]["retain.accuracy"]
    assert run["curve"][0]["retain.loss"] == pytest.approx(res["initial"]["retain.loss"],
                                                           rel=0.05)
    assert fingerprint(toy["unlearned"]) == before


def test_shrink_perturb_noises_the_model_before_the_attack(toy):
    """--shrink-perturb A: the attack starts from (1 - A) w + A B N (as undo perturb with the
    run's seed), recorded in results.json's attack; the checkpoint is not modified."""
    before = fingerprint(toy["unlearned"])
    out = toy["root"] / "sp"
    r = _attack(toy, out, "--shrink-perturb", 0.3, "--shrink-perturb-beta", 0.2, "--seed", 4,
                "--json", "--quiet", lrs="1e-3", steps=2, every=2)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["attack"]["shrink_perturb"] == {"alpha": 0.3, "beta": 0.2, "seed": 4,
                                               "noise": "xavier-uniform"}
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["arguments"]["attack"]["shrink_perturb"] == 0.3
    assert fingerprint(toy["unlearned"]) == before
    # The same start as attacking `undo perturb`'s output: identical step-0 metrics.
    noised = toy["root"] / "sp-noised"
    p = _invoke("perturb", toy["unlearned"], noised, "--alpha", 0.3, "--beta", 0.2, "--seed", 4)
    assert p.exit_code == 0, p.output
    plain = _invoke("relearn-attack", noised, "--data", toy["forget"], *toy["evals"], "--out",
                    toy["root"] / "sp-plain", "--lrs", "1e-3", "--steps", 2, "--eval-every", 2,
                    "--max-length", 16, "--batch-size", 8, "--seed", 4, "--json", "--quiet")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["initial"] == res["initial"]
    untouched = json.loads(_attack(toy, toy["root"] / "sp-none", "--json", "--quiet",
                                   lrs="1e-3", steps=2, every=2).stdout)
    assert untouched["attack"]["shrink_perturb"] is None
    assert untouched["initial"] != res["initial"]


def test_quantize_after_finetuning(toy):
    out = toy["root"] / "ft-q4"
    r = _attack(toy, out, "--quantize", 4, "--group-size", 16, "--json", "--quiet",
                "--save-models", lrs="1e-2", steps=5)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    plain, quant = res["runs"]
    assert plain["quantize"] is None and quant["quantize"]["bits"] == 4
    assert quant["quantize"]["group_size"] == 16
    assert quant["lr"] == plain["lr"] and quant["seed"] == plain["seed"]
    assert [e["step"] for e in quant["curve"]] == [5]
    last = res["worst_case"][-1]
    best = max(plain["curve"][-1]["forget.accuracy"], quant["curve"][0]["forget.accuracy"])
    assert last["step"] == 5 and last["value"] == best and "quantized" in last
    # --save-models: the finetuned and the quantised model, as plain checkpoints
    assert plain["saved_as"] == "models/adamw-constant-bs8-lr0.01-seed0"
    assert quant["saved_as"] == "models/adamw-constant-bs8-lr0.01-seed0-q4"
    finetuned, quantised = load_model(out / plain["saved_as"]), load_model(out / quant["saved_as"])
    layer = "model.layers.0.mlp.down_proj.weight"
    w, q = finetuned.state_dict()[layer], quantised.state_dict()[layer]
    assert not torch.equal(w, q)
    from undo_cli.quantize import error_bound

    assert torch.all((w - q).abs() <= error_bound(w, 4, 16) * (1 + 1e-6) + 1e-12)


def test_fail_if_gates(toy):
    out = toy["root"] / "gate-fail"
    r = _attack(toy, out, "--quiet", "--fail-if", "worst.forget.accuracy > 0.25",
                "--fail-if", "initial.retain.accuracy < 0.5", lrs="1e-2", steps=10)
    assert r.exit_code == 3, r.output
    assert "worst.forget.accuracy > 0.25" in r.stderr
    assert "worst.forget.accuracy = " in r.stderr
    assert "initial.retain.accuracy < 0.5" not in r.stderr  # that gate passed
    res = json.loads((out / "results.json").read_text())  # written before failing
    assert [g["failed"] for g in res["gates"]] == [True, False]
    assert res["gates"][0]["values"]["worst.forget.accuracy"] == res["summary"]["final"]
    out = toy["root"] / "gate-pass"
    r = _attack(toy, out, "--quiet", "--threshold", 0.5, "--fail-if",
                "steps_to_threshold < 1 or auc > 2", lrs="1e-2", steps=5)
    assert r.exit_code == 0, r.output


def test_gate_values_names():
    results = {"initial": {"f.accuracy": 0.0, "r.accuracy": 1.0},
               "runs": [{"lr": 0.1, "quantize": None, "curve": [
                   {"step": 0, "f.accuracy": 0.0, "r.accuracy": 1.0},
                   {"step": 5, "f.accuracy": 0.5, "r.accuracy": 0.9}]}],
               "worst_case": [{"step": 0, "value": 0.0, "lr": None},
                              {"step": 5, "value": 0.5, "lr": 0.1}],
               "summary": {"final": 0.5, "auc": 0.25, "threshold": 0.9,
                           "steps_to_threshold": None}}
    values = relearn.gate_values(results)
    assert values["worst.f.accuracy"] == 0.5 and values["worst.r.accuracy"] == 0.9
    assert values["initial.r.accuracy"] == 1.0 and values["auc"] == 0.25
    assert values["steps_to_threshold"] == math.inf
    assert set(values) <= set(attack_gate_names(["f.accuracy", "r.accuracy"], 0.9))
    # With a band: the forget metric's bounds are the worst case's, the summary's its own.
    results["forget_metric"] = "f.accuracy"
    results["worst_case"][-1].update(lower=0.3, upper=0.7)
    results["summary"].update(final_lower=0.3, final_upper=0.7, auc_lower=0.1, auc_upper=0.4)
    values = relearn.gate_values(results)
    assert values["worst.f.accuracy.lower"] == 0.3 and values["worst.f.accuracy.upper"] == 0.7
    assert values["final.upper"] == 0.7 and values["auc.lower"] == 0.1
    measured = ["f.accuracy", "f.accuracy_lower", "f.accuracy_upper", "r.accuracy"]
    assert set(values) <= set(attack_gate_names(measured, 0.9))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def test_compare_plots_several_results(grid, toy):
    other = toy["root"] / "other"
    r = _attack(toy, other, "--quiet", "--no-plot", lrs="1e-4", steps=5)
    assert r.exit_code == 0, r.output
    assert not (other / "relearn.png").exists()
    out = toy["root"] / "compare"
    r = _invoke("relearn-attack", "--compare", f"unlearned={grid['out']}", "--compare",
                f"slow={other}", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [i["label"] for i in summary["inputs"]] == ["unlearned", "slow"]
    assert summary["forget_metric"] == "forget.accuracy"
    assert (out / "compare.png").stat().st_size > 1000
    assert json.loads((out / "compare.json").read_text()) == summary
    assert read_manifest(out)["stage"] == "relearn-compare"
    # a CKPT with --compare, and a directory that holds no results, are refused
    r = _invoke("relearn-attack", toy["unlearned"], "--compare", grid["out"], "--out",
                toy["root"] / "c2")
    assert r.exit_code == 2 and "--compare only plots" in r.stderr
    r = _invoke("relearn-attack", "--compare", toy["root"], "--out", toy["root"] / "c3")
    assert r.exit_code == 2 and "results.json" in r.stderr


def test_without_matplotlib(grid, toy, monkeypatch):
    from undo_cli import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    r = _invoke("relearn-attack", "--compare", grid["out"], "--out", toy["root"] / "c4")
    assert r.exit_code == 2 and "pip install 'undo-cli[plot]'" in r.stderr
    out = toy["root"] / "noplot"
    r = _attack(toy, out, lrs="1e-2", steps=2, every=1)
    assert r.exit_code == 0, r.output
    assert "matplotlib is not installed" in r.stderr
    assert (out / "results.json").is_file() and not (out / "relearn.png").exists()
