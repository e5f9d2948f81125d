"""The paper's WMDP options of `undo distill`: targeted in-memory noise (`--layers`), what
trains (`--train`, `--train-layers`), the hidden-state term and the second teacher."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest
import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.data import build_stream, model_inputs
from undo_cli.distill import (
    SECOND_TEACHER_KEY,
    TeacherSwitch,
    build_student,
    hidden_term,
    kd_loss_fn,
)
from undo_cli.losses import hidden_state_mse, next_token_mask
from undo_cli.options import NoiseOptions
from undo_cli.perturb import noise_selection


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolbox")
    text = write_jsonl(root / "text.jsonl", [{"text": f"{a} + {b} = {a + b}"}
                                             for a in range(10) for b in range(10)])
    return {"root": root, "text": text,
            "teacher": make_checkpoint(root / "teacher", layers=3, seed=1),
            "second": make_checkpoint(root / "second", layers=3, seed=2),
            "gpt2": make_checkpoint(root / "gpt2", arch="gpt2", layers=3, seed=3)}


def _distill(cli, models, out, *extra):
    return cli("distill", out, "--teacher", models["teacher"], "--data", models["text"],
               "--max-length", 32, "--batch-size", 4, "--max-steps", 3, "--lr", 1e-2,
               "--quiet", "--json", *extra)


def _batch(models, seed: int = 0):
    tok = load_tokenizer(models["teacher"])
    stream = build_stream(tok, [str(models["text"])], 32, 4, seed, name="train")
    return next(stream)


# ------------------------------------------------------------------ in-memory noise


@pytest.mark.parametrize(("arch", "noise", "inside"), [
    ("teacher", NoiseOptions(alpha=0.5, beta=0.1, layers="1"), r"\.layers\.1\."),
    ("teacher", NoiseOptions(alpha=0.5, beta=0.1, layers="0-1", include=["mlp"]),
     r"\.layers\.[01]\.mlp\."),
    ("teacher", NoiseOptions(alpha=0.5, beta=0.1, exclude=[r"layers\.2\.", "embed"]),
     r"\.layers\.[01]\.|^model\.norm\.weight$|lm_head"),
    ("gpt2", NoiseOptions(alpha=0.5, beta=0.1, layers="2"), r"^transformer\.h\.2\."),
])
def test_tensors_outside_the_selection_are_unchanged_after_in_memory_noise(
        models, arch, noise, inside):
    teacher = load_model(models[arch])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student("teacher", teacher, noise, 7, 0)
    after = student.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if re.search(inside, n)
                and not (arch == "teacher" and noise.exclude and "embed" in n)
                and before[n].any()}  # (shrinking a tensor of zeros, e.g. a bias, keeps it)
    assert changed == expected
    assert all(torch.equal(before[n], after[n]) for n in before if n not in changed)
    selection = noise_selection(teacher, noise)
    assert {n for n in selection["noised"] + selection["shrunk"] if before[n].any()} == expected
    # The teacher itself is untouched.
    assert all(torch.equal(before[n], v) for n, v in teacher.state_dict().items())


def test_in_memory_layers_equal_undo_perturb_layers(cli, models, tmp_path):
    out = tmp_path / "perturbed"
    result = cli("perturb", models["teacher"], out, "--alpha", 0.5, "--beta", 0.1, "--seed", 7,
                 "--layers", "1-2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == [1, 2]
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["arguments"]["layers"] == [1, 2]
    streamed = load_model(out).state_dict()
    student = build_student("teacher", load_model(models["teacher"]),
                            NoiseOptions(alpha=0.5, beta=0.1, layers="1-2"), 7, 0).state_dict()
    for name, value in streamed.items():
        assert torch.equal(value, student[name]), name


def test_distill_records_the_noise_selection_in_the_manifest(cli, models, tmp_path):
    out = tmp_path / "noised"
    result = _distill(cli, models, out, "--alpha", 0.5, "--beta", 0.1, "--layers", "1")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "undo.json").read_text())
    record = manifest["distill"]["noise"]
    assert record["layers"] == [1] and record["noised_count"] == len(record["noised"]) > 0
    assert all(".layers.1." in n for n in record["noised"] + record["shrunk"])
    assert manifest["arguments"]["noise"]["layers"] == "1"
    bad = _distill(cli, models, tmp_path / "bad", "--alpha", 0.5, "--beta", 0.1,
                   "--layers", "3")
    assert bad.exit_code == 2 and "3 decoder layers (0..2)" in bad.stderr
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ what trains


def test_frozen_parameters_do_not_move_and_are_absent_from_the_optimizer(
        cli, models, tmp_path, monkeypatch):
    import undo_cli.distill.run as run

    seen: dict = {}
    build = run.build_student

    def capture_student(*args, **kwargs):
        seen["student"] = build(*args, **kwargs)
        return seen["student"]

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, groups, *args, **kwargs):
            seen["optimized"] = [p for g in groups for p in g["params"]]
            super().__init__(groups, *args, **kwargs)

    monkeypatch.setattr(run, "build_student", capture_student)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    out = tmp_path / "partial"
    # The paper's WMDP setting on a selection: pure shrink (beta 0) of what trains.
    result = _distill(cli, models, out, "--alpha", 0.25, "--beta", 0, "--train-layers", "1",
                      "--train", "mlp")
    assert result.exit_code == 0, result.stderr
    trained_names = {n for n, _ in seen["student"].named_parameters()
                     if ".layers.1.mlp." in n}
    names = {id(p): n for n, p in seen["student"].named_parameters()}
    assert {names[id(p)] for p in seen["optimized"]} == trained_names
    assert len(seen["optimized"]) == len(trained_names)

    teacher = load_model(models["teacher"]).state_dict()
    student = load_model(out).state_dict()
    for name, value in student.items():
        if name in trained_names:
            assert not torch.equal(value, teacher[name]), name  # shrunk, then trained
        else:
            assert torch.equal(value, teacher[name]), name  # frozen and never noised
    manifest = json.loads((out / "undo.json").read_text())
    record = manifest["distill"]
    assert set(record["trained"]["names"]) == trained_names
    assert record["trained"]["layers"] == [1] and record["trained"]["pattern"] == "mlp"
    assert record["noise"]["only_trained"] and set(record["noise"]["shrunk"]) == trained_names
    # Compute: forward 2P + activation backward 2P_backward + weight gradients 2P_trained.
    compute = manifest["compute"]
    sizes = {n: v.numel() for n, v in teacher.items()}
    ordered = list(sizes)
    p_all = sum(sizes.values())
    p_trained = sum(sizes[n] for n in trained_names)
    p_backward = sum(sizes[n] for n in ordered[ordered.index("model.layers.1.mlp.gate_proj"
                                                             ".weight"):])
    assert compute["trainable_parameters"] == p_trained
    assert compute["backward_parameters"] == p_backward
    assert compute["flops_student"] == pytest.approx(
        (2 * p_all + 2 * p_backward + 2 * p_trained) * compute["tokens"])
    assert compute["flops_student"] < 6 * p_all * compute["tokens"]
    assert json.loads(result.stdout)["trainable_parameters"] == p_trained


def test_an_explicit_noise_selection_wins_over_the_trained_one(cli, models, tmp_path):
    out = tmp_path / "explicit"
    result = _distill(cli, models, out, "--alpha", 0.25, "--beta", 0, "--train-layers", "2",
                      "--layers", "0")
    assert result.exit_code == 0, result.stderr
    teacher = load_model(models["teacher"]).state_dict()
    student = load_model(out).state_dict()
    for name, value in student.items():
        moved = not torch.equal(value, teacher[name])
        assert moved == bool(re.search(r"\.layers\.[02]\.", name)), name


def test_selections_that_cannot_work_are_refused_before_any_work(cli, models, tmp_path):
    cases = [
        (("--train-layers", "5"), "3 decoder layers"),
        (("--train", "nothing-matches"), "matches no parameter"),
        (("--train", "("), "not a valid regular expression"),
        (("--train-layers", "2-1"), "ends before it starts"),
        (("--hidden-layers", "1"), "--hidden-layers needs --hidden-loss-weight"),
        (("--hidden-loss-weight", "1", "--hidden-layers", "3"), "3 decoder layers"),
        (("--second-teacher", str(models["second"])), "go together"),
        (("--second-teacher", str(models["second"]), "--second-teacher-fraction", "0.5",
          "--cache-teacher", str(tmp_path / "cache")), "cannot be combined"),
        (("--second-teacher-fraction", "1.5"), "at most 1"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        result = _distill(cli, models, out, "--student", "random", *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert not out.exists()


# ------------------------------------------------------------------ hidden-state term


def test_hidden_term_equals_a_direct_computation(models):
    teacher = load_model(models["teacher"]).eval()
    student = build_student("teacher", teacher, NoiseOptions(alpha=0.5, beta=0.1), 0, 0)
    batch = _batch(models)
    weight, layers = 3.0, [0, 2]
    plain = kd_loss_fn(teacher)(student, {"train": batch})[0]
    both, terms = kd_loss_fn(teacher, hidden_weight=weight, hidden_layers=layers)(
        student, {"train": batch})
    # Directly: every layer's output from each model's own forward, MSE per position and
    # unit, mean over layers, mean over the distilled positions.
    with torch.no_grad():
        t = teacher(**model_inputs(batch), output_hidden_states=True).hidden_states
        s = student(**model_inputs(batch), output_hidden_states=True).hidden_states
    mask = next_token_mask(batch["labels"])
    per_layer = [((s[i + 1] - t[i + 1]) ** 2).mean(-1)[mask].mean() for i in layers]
    direct = sum(per_layer) / len(layers)
    assert terms["hidden_mse"].item() == pytest.approx(direct.item(), rel=1e-4)
    assert both.item() == pytest.approx(plain.item() + weight * direct.item(), rel=1e-4)
    # All layers by default.
    _, default = kd_loss_fn(teacher, hidden_weight=1.0)(student, {"train": batch})
    every = sum(((s[i + 1] - t[i + 1]) ** 2).mean(-1)[mask].mean() for i in range(3)) / 3
    assert default["hidden_mse"].item() == pytest.approx(every.item(), rel=1e-4)


def test_hidden_term_gradient_flows_only_where_it_should(models):
    teacher = load_model(models["teacher"]).eval()
    teacher.requires_grad_(True)  # so that a leak into the teacher would show
    student = build_student("teacher", teacher, NoiseOptions(alpha=0.5, beta=0.1), 0, 0)
    batch = _batch(models)
    mask = next_token_mask(batch["labels"])
    with torch.no_grad():
        t = teacher(**model_inputs(batch), output_hidden_states=True).hidden_states
    s = student(**model_inputs(batch), output_hidden_states=True).hidden_states
    hidden_term(s, t, mask, [0]).backward()  # layer 0's output only
    grads = {n: p.grad for n, p in student.named_parameters()}
    for name, grad in grads.items():
        reaches = name.startswith(("model.embed_tokens", "model.layers.0."))
        if reaches:
            assert grad is not None and grad.abs().sum() > 0, name
        else:  # layers above the compared one, the final norm and the head get nothing
            assert grad is None or grad.abs().sum() == 0, name
    assert all(p.grad is None for p in teacher.parameters())
    # Positions outside the mask do not count: changing the teacher there changes nothing.
    shifted = [x.clone() for x in t]
    for x in shifted:
        x[~mask] += 5.0
    assert hidden_term(s, shifted, mask, [0]).item() == pytest.approx(
        hidden_term(s, t, mask, [0]).item())
    assert hidden_state_mse([s[1]], [t[1]], mask).item() == pytest.approx(
        hidden_term(s, t, mask, [0]).item())


def test_hidden_loss_run_logs_its_term(cli, models, tmp_path):
    out = tmp_path / "hidden"
    result = _distill(cli, models, out, "--alpha", 0.5, "--beta", 0.1, "--hidden-loss-weight",
                      10, "--hidden-layers", "0-1", "--log-every", 1)
    assert result.exit_code == 0, result.stderr
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(e["hidden_mse"] > 0 for e in log if e["type"] == "train")
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["distill"]["hidden_loss"] == {"weight": 10.0, "layers": [0, 1]}


# ------------------------------------------------------------------ second teacher


class _Positions:
    """A stream of empty batches that counts its position like `BatchStream`."""

    def __init__(self):
        self.position = 0
        self.last_tokens = 10

    def __next__(self):
        self.position += 1
        return {"attention_mask": torch.ones(1, 10)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize("fraction", [0.3, 0.25, 1 / 3, 0.9, 1.0])
def test_second_teacher_takes_the_stated_fraction_of_micro_batches(fraction):
    switch = TeacherSwitch(_Positions(), fraction, seed=0)
    marks = [int(next(switch)[SECOND_TEACHER_KEY]) for _ in range(300)]
    p = Fraction(fraction)
    assert sum(marks) in (int(300 * p), -(-300 * p.numerator // p.denominator))
    for n in (7, 10, 50):  # any n consecutive micro-batches: floor(nP) or ceil(nP)
        for start in range(0, 300 - n):
            got = sum(marks[start:start + n])
            assert int(n * p) <= got <= -(-n * p.numerator // p.denominator)
    use = switch.describe_use()
    assert use["batches"] == sum(marks) and use["of_batches"] == 300
    assert use["unit"] == "micro-batch" and use["tokens"] == 10 * sum(marks)


def test_second_teacher_choice_is_deterministic_per_seed_and_survives_resume():
    def marks(seed, n=60, resume_at=None):
        switch = TeacherSwitch(_Positions(), 0.4, seed=seed)
        out = []
        for i in range(n):
            if i == resume_at:  # a fresh wrapper restored from the saved state
                state = switch.state_dict()
                switch = TeacherSwitch(_Positions(), 0.4, seed=seed)
                switch.load_state_dict(state)
            out.append(int(next(switch)[SECOND_TEACHER_KEY]))
        return out, switch.describe_use()

    a, use_a = marks(0)
    assert marks(0)[0] == a
    # Other seeds shift which micro-batches are marked (P = 2/5: five phases in all).
    assert len({tuple(marks(seed)[0]) for seed in range(8)}) > 1
    b, use_b = marks(0, resume_at=25)
    assert b == a and use_b == use_a


def test_a_marked_batch_is_distilled_from_the_second_teacher(models):
    teacher = load_model(models["teacher"]).eval()
    second = load_model(models["second"]).eval()
    student = build_student("teacher", teacher, NoiseOptions(alpha=0.5, beta=0.1), 0, 0)
    batch = _batch(models)
    both = kd_loss_fn(teacher, second_teacher=second, hidden_weight=1.0)
    first_only = kd_loss_fn(teacher, hidden_weight=1.0)
    second_only = kd_loss_fn(second, hidden_weight=1.0)
    for mark, reference in ((0, first_only), (1, second_only)):
        marked = {**batch, SECOND_TEACHER_KEY: torch.tensor(mark)}
        loss, terms = both(student, {"train": marked})
        expected, _ = reference(student, {"train": batch})
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert terms["second_teacher"] == float(mark)


def test_second_teacher_run_records_its_share_and_compute(cli, models, tmp_path):
    out = tmp_path / "two"
    result = _distill(cli, models, out, "--alpha", 0.5, "--beta", 0.1, "--second-teacher",
                      models["second"], "--second-teacher-fraction", 0.5, "--max-steps", 4,
                      "--grad-accum", 2)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "undo.json").read_text())
    use = manifest["compute"]["second_teacher"]
    assert use["of_batches"] == 8 and use["batches"] == 4  # micro-batches, exactly half
    assert {p["role"] for p in manifest["parents"]} == {"teacher", "second_teacher"}
    size = sum(v.numel() for v in load_model(models["second"]).state_dict().values())
    compute = manifest["compute"]
    assert compute["flops_teacher"] == pytest.approx(
        2 * size * (use["tokens"] + use["first_teacher_tokens"]))
    assert use["tokens"] + use["first_teacher_tokens"] == compute["tokens"]
    assert manifest["arguments"]["settings"]["second_teacher_fraction"] == 0.5
    again = _distill(cli, models, tmp_path / "again", "--alpha", 0.5, "--beta", 0.1,
                     "--second-teacher", models["second"], "--second-teacher-fraction", 0.5,
                     "--max-steps", 4, "--grad-accum", 2)
    assert again.exit_code == 0, again.stderr
    a, b = load_model(out).state_dict(), load_model(tmp_path / "again").state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
