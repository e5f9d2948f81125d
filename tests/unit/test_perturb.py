"""`undo perturb`: the paper's noise step, streamed (formula, ties, sharding, determinism,
bad input, atomicity) and its in-memory twin used by distill."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors import safe_open

from undo_cli.checkpoint import read_manifest
from undo_cli.checkpoint.safetensors_io import INDEX_NAME, CheckpointReader, save_tensors
from undo_cli.errors import DataError, UsageError
from undo_cli.options import NoiseOptions, SaveOptions
from undo_cli.perturb import (
    fan_in_and_fan_out,
    noise_scale,
    perturb_checkpoint,
    perturb_model_,
    perturb_state_dict,
    perturb_tensor,
)
from undo_cli.perturb import noise as noise_mod

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with safetensors itself."""
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def weight_bytes(directory: Path) -> dict[str, bytes]:
    """Weight files and index of a checkpoint, by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
            if p.name.endswith(".safetensors") or p.name == INDEX_NAME}


def resave(src: Path, dst: Path, tensors: dict[str, torch.Tensor], **kwargs) -> Path:
    """A copy of checkpoint `src` (config, tokenizer) with `tensors` as its weights."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_NAME:
            shutil.copy(p, dst / p.name)
    save_tensors(tensors, dst, **kwargs)
    return dst


def tmp_siblings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.undo-")]


@pytest.fixture()
def small_chunks(monkeypatch):
    """Tiny noise chunks (and copy pieces) so tiny models exercise the multi-chunk paths."""
    monkeypatch.setattr(noise_mod, "CHUNK_ELEMENTS", 777)
    monkeypatch.setattr(noise_mod, "COPY_CHUNK_BYTES", 1000)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A Llama with larger matrices, for the statistics of the noise."""
    return make_checkpoint(tmp_path_factory.mktemp("models") / "wide", hidden=64,
                           intermediate=256, heads=4)


# ------------------------------------------------------------------------------------------
# The formula
# ------------------------------------------------------------------------------------------

def test_fans_match_torch():
    for shape in [(3, 5), (64, 32), (4, 3, 2), (8, 2, 3, 3)]:
        assert fan_in_and_fan_out(shape) == \
            torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert noise_scale((10, 20), "xavier-uniform") == pytest.approx(math.sqrt(6 / 30))
    assert noise_scale((10, 20), "xavier-normal") == pytest.approx(math.sqrt(2 / 30))


@pytest.mark.parametrize("noise", ["xavier-uniform", "xavier-normal"])
def test_formula_holds_for_every_tensor(wide_llama, tmp_path, noise):
    """Recover N = (out - (1 - alpha) w) / (alpha beta) from the output: it is Xavier noise of
    the right bound and variance for every 2-D tensor; 1-D tensors are exactly shrunk."""
    alpha, beta = 0.6, 0.1
    out = tmp_path / "out"
    perturb_checkpoint(wide_llama, out, NoiseOptions(alpha=alpha, beta=beta, noise=noise), seed=3)
    before, after = load_weights(wide_llama), load_weights(out)
    assert set(before) == set(after)
    pooled = []
    for name, w in before.items():
        o = after[name]
        assert o.dtype == w.dtype and o.shape == w.shape
        if w.ndim == 1:
            assert torch.equal(o, w * (1 - alpha)), name
            continue
        n = (o.double() - (1 - alpha) * w.double()) / (alpha * beta)
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
        if noise == "xavier-uniform":
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert n.abs().max() <= bound * (1 + 1e-4), name
            var = bound**2 / 3
        else:
            var = 2 / (fan_in + fan_out)
        # Per tensor: variance within a generous margin; pooled below: tight.
        assert n.var().item() == pytest.approx(var, rel=0.25), name
        assert n.mean().item() == pytest.approx(0, abs=4 * math.sqrt(var / n.numel())), name
        pooled.append((n / math.sqrt(var)).reshape(-1))
    z = torch.cat(pooled)
    assert z.numel() > 100_000
    assert z.mean().item() == pytest.approx(0, abs=0.02)
    assert z.var().item() == pytest.approx(1, abs=0.02)
    if noise == "xavier-uniform":  # uniform: the 4th moment is 9/5 of a unit variance
        assert (z**4).mean().item() == pytest.approx(9 / 5, abs=0.05)
    else:
        assert (z**4).mean().item() == pytest.approx(3, abs=0.1)


def test_formula_exactly_reproduced_from_pure_noise(tiny_llama, tmp_path):
    """alpha = beta = 1 yields the noise N itself; any alpha, beta give fp32
    (1 - alpha) * w + (alpha * beta) * N, rounded once to the tensor's dtype."""
    pure = tmp_path / "pure"
    mixed = tmp_path / "mixed"
    perturb_checkpoint(tiny_llama, pure, NoiseOptions(alpha=1.0, beta=1.0), seed=5)
    perturb_checkpoint(tiny_llama, mixed, NoiseOptions(alpha=0.3, beta=0.7), seed=5)
    w, n, o = load_weights(tiny_llama), load_weights(pure), load_weights(mixed)
    for name in w:
        if w[name].ndim == 1:
            assert torch.equal(n[name], torch.zeros_like(w[name]))
            continue
        expected = w[name] * (1 - 0.3) + n[name] * (0.3 * 0.7)
        assert torch.equal(o[name], expected), name


def test_alpha_zero_is_a_byte_identical_copy(tiny_llama, tiny_gpt2, tmp_path):
    for src in (tiny_llama, tiny_gpt2):
        out = tmp_path / src.name
        summary = perturb_checkpoint(src, out, NoiseOptions(alpha=0.0, beta=0.1))
        assert summary["noised"] == summary["shrunk"] == 0
        assert weight_bytes(out) == weight_bytes(src)


def test_alpha_one_beta_one_is_a_fresh_xavier_init(tiny_llama, tmp_path):
    """The output no longer depends on the input weights at all."""
    other = make_checkpoint(tmp_path / "other", seed=123)
    perturb_checkpoint(tiny_llama, tmp_path / "a", NoiseOptions(alpha=1.0, beta=1.0), seed=9)
    perturb_checkpoint(other, tmp_path / "b", NoiseOptions(alpha=1.0, beta=1.0), seed=9)
    a, b, w = load_weights(tmp_path / "a"), load_weights(tmp_path / "b"), load_weights(other)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if w[name].ndim == 2:
            bound = math.sqrt(6 / sum(torch.nn.init._calculate_fan_in_and_fan_out(w[name])))
            assert a[name].abs().max() <= bound
            assert not torch.equal(a[name], w[name])


def test_bf16_checkpoint_keeps_dtype_noise_in_fp32(tiny_llama, tmp_path):
    weights = load_weights(tiny_llama)
    bf16 = resave(tiny_llama, tmp_path / "bf16",
                  {k: v.to(torch.bfloat16) for k, v in weights.items()})
    perturb_checkpoint(bf16, tmp_path / "out", NoiseOptions(), seed=1)
    perturb_checkpoint(tiny_llama, tmp_path / "noise", NoiseOptions(alpha=1.0, beta=1.0), seed=1)
    out, noise = load_weights(tmp_path / "out"), load_weights(tmp_path / "noise")
    for name, w in weights.items():
        w16 = w.to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16
        if w.ndim == 1:
            expected = (w16.float() * 0.4).to(torch.bfloat16)
        else:  # same noise as the fp32 model: it depends on (seed, name) only
            expected = (w16.float() * 0.4 + noise[name] * (0.6 * 0.1)).to(torch.bfloat16)
        assert torch.equal(out[name], expected), name


def test_non_float_tensors_are_copied(tiny_llama, tmp_path):
    weights = load_weights(tiny_llama)
    weights["model.position_ids"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    weights["model.mask"] = torch.tensor([[True, False], [False, True]])
    src = resave(tiny_llama, tmp_path / "src", weights)
    summary = perturb_checkpoint(src, tmp_path / "out", NoiseOptions(alpha=0.5, beta=0.5))
    out = load_weights(tmp_path / "out")
    assert torch.equal(out["model.position_ids"], weights["model.position_ids"])
    assert torch.equal(out["model.mask"], weights["model.mask"])
    assert summary["copied"] == 2


def test_include_and_exclude(tiny_llama, tmp_path):
    w = load_weights(tiny_llama)
    perturb_checkpoint(tiny_llama, tmp_path / "ex",
                       NoiseOptions(alpha=0.5, beta=0.1, exclude=["norm", "embed"]))
    ex = load_weights(tmp_path / "ex")
    for name in w:
        unchanged = "norm" in name or "embed" in name
        assert torch.equal(ex[name], w[name]) == unchanged, name
    summary = perturb_checkpoint(tiny_llama, tmp_path / "in",
                                 NoiseOptions(alpha=0.5, beta=0.1, include=r"\.mlp\."))
    inc = load_weights(tmp_path / "in")
    for name in w:
        assert torch.equal(inc[name], w[name]) == (".mlp." not in name), name
    assert summary["noised"] == 6 and summary["shrunk"] == 0


@pytest.mark.parametrize(("ckpt", "layers", "inside"), [
    ("tiny_llama", "1", "model.layers.1."), ("tiny_gpt2", "0", "transformer.h.0.")])
def test_layers_noise_only_those_decoder_layers(ckpt, layers, inside, request, tmp_path, cli):
    src = request.getfixturevalue(ckpt)
    w = load_weights(src)
    out = tmp_path / "out"
    result = cli("perturb", src, out, "--alpha", 0.5, "--beta", 0.1, "--layers", layers,
                 "--json")
    assert result.exit_code == 0, result.stderr
    got = load_weights(out)
    for name in w:  # (gpt2's zero biases stay zero when shrunk)
        moved = not torch.equal(got[name], w[name])
        assert moved == (name.startswith(inside) and bool(w[name].any())), name
    summary = json.loads(result.stdout)
    assert summary["layers"] == [int(layers)]
    manifest = read_manifest(out)
    assert manifest["arguments"]["layers"] == [int(layers)]
    pattern = manifest["arguments"]["layer_pattern"]
    assert [n for n in w if re.search(pattern, n)] == [n for n in w if n.startswith(inside)]
    # --include narrows the layers further.
    perturb_checkpoint(src, tmp_path / "narrow",
                       NoiseOptions(alpha=0.5, beta=0.1, layers=layers, include="mlp"))
    narrow = load_weights(tmp_path / "narrow")
    for name in w:
        moved = not torch.equal(narrow[name], w[name])
        assert moved == (name.startswith(inside) and ".mlp." in name
                         and bool(w[name].any())), name


def test_layers_the_model_lacks_exit_2_before_writing(tiny_llama, tmp_path, cli):
    for layers, message in (("2", "has 2 decoder layers (0..1)"), ("1-0", "ends before")):
        result = cli("perturb", tiny_llama, tmp_path / "never", "--layers", layers)
        assert result.exit_code == 2 and message in result.stderr
        assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------
# Tied weights
# ------------------------------------------------------------------------------------------

def test_tied_gpt2_stays_tied_and_is_noised(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    perturb_checkpoint(tiny_gpt2, out, NoiseOptions())
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.transformer.wte.weight, original.transformer.wte.weight)
    # noised exactly once, as the embedding
    expected = perturb_tensor("transformer.wte.weight", original.transformer.wte.weight,
                              NoiseOptions())
    assert torch.equal(model.lm_head.weight, expected)


def test_checkpoint_storing_both_tied_names(tiny_gpt2, tmp_path):
    """A checkpoint with both the embedding and the head stored: both come out identical,
    equal to the embedding noised under its own name (noised once, copied once)."""
    weights = load_weights(tiny_gpt2)
    wte = weights["transformer.wte.weight"]
    both = resave(tiny_gpt2, tmp_path / "both", {**weights, "lm_head.weight": wte.clone()},
                  max_shard_size=4000)
    summary = perturb_checkpoint(both, tmp_path / "out", NoiseOptions(), seed=4)
    assert summary["tied_copies"] == 1
    assert summary["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
    out = load_weights(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    perturb_checkpoint(tiny_gpt2, tmp_path / "single", NoiseOptions(), seed=4)
    assert torch.equal(out["transformer.wte.weight"],
                       load_weights(tmp_path / "single")["transformer.wte.weight"])


def test_untied_llama_head_gets_its_own_noise(tiny_llama, tmp_path):
    perturb_checkpoint(tiny_llama, tmp_path / "out", NoiseOptions(alpha=1.0, beta=1.0))
    out = load_weights(tmp_path / "out")
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------
# Sharding and determinism
# ------------------------------------------------------------------------------------------

def test_sharded_input_is_sharded_alike(tiny_llama, tmp_path):
    sharded = resave(tiny_llama, tmp_path / "sharded", load_weights(tiny_llama),
                     max_shard_size=20_000)
    summary = perturb_checkpoint(sharded, tmp_path / "out", NoiseOptions(), seed=2)
    assert len(summary["files"]) > 1
    assert sorted(summary["files"]) == sorted(
        p.name for p in sharded.glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["weight_map"] == json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    # same values as from the single-file input: noise depends on (seed, name) only
    perturb_checkpoint(tiny_llama, tmp_path / "single", NoiseOptions(), seed=2)
    a, b = load_weights(tmp_path / "out"), load_weights(tmp_path / "single")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_max_shard_size_output_independent_of_input_sharding(tiny_llama, tmp_path):
    sharded = resave(tiny_llama, tmp_path / "sharded", load_weights(tiny_llama),
                     max_shard_size=7_000)
    perturb_checkpoint(tiny_llama, tmp_path / "a", NoiseOptions(),
                       save=SaveOptions(max_shard_size="30KB"))
    perturb_checkpoint(sharded, tmp_path / "b", NoiseOptions(),
                       save=SaveOptions(max_shard_size="30000"))
    a = weight_bytes(tmp_path / "a")
    assert len([n for n in a if n.endswith(".safetensors")]) == 4
    assert INDEX_NAME in a
    assert a == weight_bytes(tmp_path / "b")
    # one shard: a plain model.safetensors, no index
    perturb_checkpoint(sharded, tmp_path / "c", NoiseOptions(),
                       save=SaveOptions(max_shard_size="1GB"))
    assert list(weight_bytes(tmp_path / "c")) == ["model.safetensors"]


def test_sharded_output_loads_with_from_pretrained(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    perturb_checkpoint(tiny_llama, tmp_path / "out", NoiseOptions(),
                       save=SaveOptions(max_shard_size="20KB"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    out = load_weights(tmp_path / "out")
    for name, p in model.state_dict().items():
        assert torch.equal(p, out[name]), name


def test_deterministic_byte_identical(tiny_llama, tmp_path, small_chunks):
    perturb_checkpoint(tiny_llama, tmp_path / "a", NoiseOptions(), seed=11, threads=1)
    perturb_checkpoint(tiny_llama, tmp_path / "b", NoiseOptions(), seed=11, threads=3)
    perturb_checkpoint(tiny_llama, tmp_path / "c", NoiseOptions(), seed=12)
    assert weight_bytes(tmp_path / "a") == weight_bytes(tmp_path / "b")
    assert weight_bytes(tmp_path / "a") != weight_bytes(tmp_path / "c")
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tiny_llama / name).read_bytes()


def test_noise_independent_of_torch_threads():
    w = torch.randn(3000, 700)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = perturb_tensor("w", w, NoiseOptions(), threads=1)
        torch.set_num_threads(2)
        b = perturb_tensor("w", w, NoiseOptions(), threads=2)
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)
    assert not torch.equal(a, perturb_tensor("w2", w, NoiseOptions()))  # keyed by name
    assert not torch.equal(a, perturb_tensor("w", w, NoiseOptions(), seed=1))


def test_multi_chunk_tensors_match_in_memory(tiny_llama, tmp_path, small_chunks):
    summary = perturb_checkpoint(tiny_llama, tmp_path / "out", NoiseOptions(), seed=7)
    assert summary["parameters_noised"] > 20 * noise_mod.CHUNK_ELEMENTS
    out = load_weights(tmp_path / "out")
    for name, w in load_weights(tiny_llama).items():
        assert torch.equal(out[name], perturb_tensor(name, w, NoiseOptions(), seed=7)), name


# ------------------------------------------------------------------------------------------
# The in-memory path (undo distill --alpha --beta) gives the same weights
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2", "bf16"])
def test_in_memory_equals_streamed(request, tmp_path, model_name):
    from transformers import AutoModelForCausalLM

    if model_name == "bf16":
        base = request.getfixturevalue("tiny_llama")
        src = resave(base, tmp_path / "bf16",
                     {k: v.to(torch.bfloat16) for k, v in load_weights(base).items()})
    else:
        src = request.getfixturevalue(model_name)
    dtype = torch.bfloat16 if model_name == "bf16" else torch.float32
    perturb_checkpoint(src, tmp_path / "out", NoiseOptions(exclude="ln_f"), seed=21)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    perturb_model_(model, NoiseOptions(exclude="ln_f"), seed=21)
    expected = streamed.state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == expected[name].dtype == dtype
        assert torch.equal(value, expected[name]), name
    if model_name == "tiny_gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight


def test_perturb_state_dict_does_not_modify_its_input(tiny_llama):
    weights = load_weights(tiny_llama)
    before = {k: v.clone() for k, v in weights.items()}
    new = perturb_state_dict(weights, NoiseOptions())
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    assert not torch.equal(new["lm_head.weight"], weights["lm_head.weight"])


# ------------------------------------------------------------------------------------------
# Output and CLI
# ------------------------------------------------------------------------------------------

def test_manifest_and_summary(tiny_llama, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("perturb", tiny_llama, out, "--alpha", "0.5", "--beta", "0.2", "--seed", "3",
                 "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["alpha"] == 0.5 and summary["beta"] == 0.2 and summary["seed"] == 3
    assert summary["noised"] == 16 and summary["shrunk"] == 5
    manifest = read_manifest(out)
    assert manifest["stage"] == "perturb"
    assert manifest["seed"] == 3
    assert manifest["arguments"]["alpha"] == 0.5
    assert manifest["parents"][0]["role"] == "input"
    assert manifest["parents"][0]["fingerprint"].startswith("blake3:")
    assert manifest["perturb"]["noised"] == 16
    assert manifest["wall_time_s"] is not None


def test_cli_defaults_are_the_papers(tiny_llama, tmp_path, cli):
    result = cli("perturb", "--help")
    assert "0.6" in result.output and "0.1" in result.output
    assert "recommended" in result.output
    result = cli("perturb", tiny_llama, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert read_manifest(tmp_path / "out")["arguments"]["alpha"] == 0.6
    assert read_manifest(tmp_path / "out")["arguments"]["beta"] == 0.1


def test_progress_reports_all_bytes(tiny_llama, tmp_path):
    calls = []
    perturb_checkpoint(tiny_llama, tmp_path / "out", NoiseOptions(), progress=lambda done,
                       total: calls.append((done, total)))
    total = sum(p.numel() * p.element_size() for p in load_weights(tiny_llama).values())
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\x00\xff{["
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("case", [
    "alpha_negative", "alpha_above_one", "alpha_nan", "beta_negative", "beta_inf",
    "missing_input", "not_a_checkpoint", "input_is_file", "corrupt", "truncated",
    "output_inside_input", "output_exists", "unknown_noise", "bad_regex", "bad_shard_size",
    "pickled_only",
])
def test_bad_input_one_line_error_and_nothing_written(tiny_llama, tmp_path, cli, case):
    src, out = tiny_llama, tmp_path / "out"
    extra: list[str] = []
    if case == "alpha_negative":
        extra = ["--alpha", "-0.1"]
    elif case == "alpha_above_one":
        extra = ["--alpha", "1.5"]
    elif case == "alpha_nan":
        extra = ["--alpha", "nan"]
    elif case == "beta_negative":
        extra = ["--beta", "-1"]
    elif case == "beta_inf":
        extra = ["--beta", "inf"]
    elif case == "missing_input":
        src = tmp_path / "nope"
    elif case == "not_a_checkpoint":
        src = tmp_path / "plain"
        src.mkdir()
        (src / "notes.txt").write_text("hi")
    elif case == "input_is_file":
        src = tiny_llama / "config.json"
    elif case in ("corrupt", "truncated"):
        src = tmp_path / "src"
        shutil.copytree(tiny_llama, src)
        weights = src / "model.safetensors"
        if case == "corrupt":
            _corrupt(weights)
        else:
            weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "output_inside_input":
        src = tmp_path / "src"
        shutil.copytree(tiny_llama, src)
        out = src / "out"
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "unknown_noise":
        extra = ["--noise", "gaussian"]
    elif case == "bad_regex":
        extra = ["--exclude", "(unclosed"]
    elif case == "bad_shard_size":
        extra = ["--max-shard-size", "lots"]
    elif case == "pickled_only":
        src = tmp_path / "pickled"
        src.mkdir()
        shutil.copy(tiny_llama / "config.json", src)
        torch.save({"w": torch.ones(2)}, src / "pytorch_model.bin")
    result = cli("perturb", src, out, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    if case == "output_exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not tmp_siblings(out)


def test_overwrite_replaces_existing_output(tiny_llama, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli("perturb", tiny_llama, out, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_bad_options_in_the_library_raise_usage_error(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="alpha"):
        perturb_tensor("w", torch.ones(2, 2), NoiseOptions(alpha=2.0, beta=0.1))
    with pytest.raises(UsageError, match="noise"):
        perturb_checkpoint(tiny_llama, tmp_path / "o",
                           NoiseOptions(alpha=0.5, beta=0.1, noise="pink"))
    with pytest.raises(UsageError, match="threads"):
        perturb_checkpoint(tiny_llama, tmp_path / "o", NoiseOptions(alpha=0.5, beta=0.1), threads=0)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# Atomicity
# ------------------------------------------------------------------------------------------

def test_corrupt_later_shard_leaves_nothing(tiny_llama, tmp_path, cli):
    sharded = resave(tiny_llama, tmp_path / "sharded", load_weights(tiny_llama),
                     max_shard_size=20_000)
    last = sorted(sharded.glob("*.safetensors"))[-1]
    _corrupt(last)
    out = tmp_path / "deep" / "out"
    result = cli("perturb", sharded, out)
    assert result.exit_code == 2
    assert last.name in result.stderr
    assert not out.exists() and not out.parent.exists()


def test_failure_mid_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    sharded = resave(tiny_llama, tmp_path / "sharded", load_weights(tiny_llama),
                     max_shard_size=20_000)
    last_file = sorted(sharded.glob("*.safetensors"))[-1]
    real = CheckpointReader.view_bytes

    def failing(self, name, start, nbytes):
        if self.entries[name].path == last_file:
            raise DataError("simulated read failure", last_file)
        return real(self, name, start, nbytes)

    monkeypatch.setattr(CheckpointReader, "view_bytes", failing)
    out = tmp_path / "out"
    written = []
    with pytest.raises(DataError, match="simulated"):
        perturb_checkpoint(sharded, out, NoiseOptions(), progress=lambda done,
                           total: written.append(done))
    assert written  # the failure happened after some tensors were written
    assert not out.exists()
    assert not tmp_siblings(out)


def _big_checkpoint(tiny_llama: Path, path: Path) -> Path:
    """~130 MB of weights: big enough that writing them takes a moment."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.rand(1024, 2048, generator=g)
               for i in range(16)}
    return resave(tiny_llama, path, tensors, max_shard_size="40MB")


def test_kill_9_mid_write_leaves_no_output(tiny_llama, tmp_path):
    src = _big_checkpoint(tiny_llama, tmp_path / "big")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "undo_cli", "perturb", str(src), str(out), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    killed_mid_write = False
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            for tmp in tmp_siblings(out):
                if any(p.stat().st_size > 0 for p in tmp.glob("*.safetensors")):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_mid_write = True
                    break
            if killed_mid_write:
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not killed_mid_write:
            proc.kill()
        proc.wait()
    assert killed_mid_write, proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tmp_siblings(out)  # only the hidden temporary sibling is left ...
    small = tmp_path / "small"
    shutil.copytree(tiny_llama, small)
    perturb_checkpoint(small, out, NoiseOptions())  # ... and the next run removes it
    assert out.is_dir()
    assert not tmp_siblings(out)


# ------------------------------------------------------------------------------------------
# The numpy arithmetic against torch's own conversions
# ------------------------------------------------------------------------------------------

def _edge_floats() -> torch.Tensor:
    """fp32 values that stress rounding to 16 bits: random, ties, overflow, subnormals."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (20000,), generator=g, dtype=torch.int64)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, 1e-8, -3e-39,
                             3.3895e38, float("inf"), float("-inf")])
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x477FF000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    random = bits.to(torch.int32).view(torch.float32)
    values = torch.cat([random[torch.isfinite(random)], specials, ties,
                        torch.randn(5000, generator=g)])
    return values


@pytest.mark.parametrize(("dtype", "name"), [(torch.bfloat16, "BF16"), (torch.float16, "F16"),
                                             (torch.float8_e4m3fn, "F8_E4M3")])
def test_rounding_to_narrow_dtypes_matches_torch(dtype, name):
    """fp32 -> bf16/fp16/fp8 in numpy (integer rounding for bf16) equals torch's `.to`."""
    import numpy as np

    values = _edge_floats()
    if dtype == torch.float8_e4m3fn:  # no infinity in e4m3fn: stay inside its range
        values = values[values.abs() < 400]
    bufs = noise_mod.Buffers()
    got = noise_mod._narrow(values.numpy().copy(), name,
                              lambda slot, dt: bufs.get(slot, dt, values.numel()))
    expected = values.to(dtype).view(torch.uint8).numpy()
    assert np.array_equal(got, expected)
    # and back: widening is exact
    wide = noise_mod._widen(expected, name, np.empty(values.numel(), np.float32))
    assert torch.equal(torch.from_numpy(wide), values.to(dtype).float())


def test_bf16_nan_becomes_torch_quiet_nan():
    import numpy as np

    values = np.array([np.nan, 1.0, -np.nan], dtype=np.float32)
    bufs = noise_mod.Buffers()
    got = noise_mod._narrow(values, "BF16", lambda slot, dt: bufs.get(slot, dt, 3))
    assert got.view(np.uint16).tolist() == [0x7FC0, 0x3F80, 0x7FC0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float8_e5m2])
def test_other_float_dtypes_follow_the_formula(tiny_llama, tmp_path, dtype):
    """fp16, fp64 and fp8 checkpoints: (1 - alpha) * w + alpha * beta * N computed in fp32
    (fp64 for fp64) with the same noise as the fp32 model, rounded once to the dtype."""
    weights = load_weights(tiny_llama)
    src = resave(tiny_llama, tmp_path / "src", {k: v.to(dtype) for k, v in weights.items()})
    perturb_checkpoint(src, tmp_path / "out", NoiseOptions(), seed=1)
    perturb_checkpoint(tiny_llama, tmp_path / "noise", NoiseOptions(alpha=1.0, beta=1.0), seed=1)
    out, noise = load_weights(tmp_path / "out"), load_weights(tmp_path / "noise")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    for name, w in weights.items():
        w = w.to(dtype).to(work)
        expected = w * 0.4
        if w.ndim > 1:
            expected = expected + noise[name].to(work) * (0.6 * 0.1)
        assert out[name].dtype == dtype
        assert torch.equal(out[name].to(work), expected.to(dtype).to(work)), name


# ------------------------------------------------------------------------------------------
# Issue 19: every tensor arrives, and no NaN/inf is written unless asked
# ------------------------------------------------------------------------------------------


def test_shards_sharing_a_file_name_in_subdirectories_all_survive(tiny_llama, tmp_path):
    """Two shards called model.safetensors in a/ and b/ are two files: before, the second
    overwrote the first and half the tensors were lost (exit 0)."""
    weights = load_weights(tiny_llama)
    ckpt = resave(tiny_llama, tmp_path / "ckpt", {})
    for p in ckpt.glob("*.safetensors"):
        p.unlink()
    names = sorted(weights)
    weight_map = {}
    for sub, part in (("a", names[::2]), ("b", names[1::2])):
        (ckpt / sub).mkdir()
        save_tensors({n: weights[n] for n in part}, ckpt / sub)
        weight_map.update({n: f"{sub}/model.safetensors" for n in part})
    (ckpt / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    summary = perturb_checkpoint(ckpt, out, NoiseOptions(), seed=2)
    assert summary["files"] == ["a/model.safetensors", "b/model.safetensors"]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == weight_map
    with CheckpointReader(out) as written, CheckpointReader(ckpt) as original:
        assert {n: (e.dtype, e.shape) for n, e in written.entries.items()} == {
            n: (e.dtype, e.shape) for n, e in original.entries.items()}
    expected = perturb_checkpoint(tiny_llama, tmp_path / "flat", NoiseOptions(), seed=2)
    assert expected["noised"] == summary["noised"]
    from undo_cli.checkpoint import load_model

    load_model(out)  # loads completely (the loading report is checked)


def test_the_output_is_verified_before_it_is_put_in_place(tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from undo_cli.errors import UndoError
    from undo_cli.perturb import stream

    real = stream.write_perturbed

    def lose_a_tensor(reader, plan, directory, *args, **kwargs):
        files = real(reader, plan, directory, *args, **kwargs)
        state = load_file(directory / files[0])
        del state["model.norm.weight"]
        save_file(state, directory / files[0], metadata={"format": "pt"})
        return files

    monkeypatch.setattr(stream, "write_perturbed", lose_a_tensor)
    out = tmp_path / "out"
    with pytest.raises(UndoError, match="perturb wrote tensor 'model.norm.weight' wrongly "
                                        r"\(missing"):
        perturb_checkpoint(tiny_llama, out, NoiseOptions())
    assert not out.exists() and tmp_siblings(out) == []


def test_nonfinite_weights_are_refused_unless_allowed(tiny_llama, tmp_path, cli):
    weights = load_weights(tiny_llama)
    bad = dict(weights)
    bad["model.norm.weight"] = weights["model.norm.weight"].clone()
    bad["model.norm.weight"][3] = float("inf")
    src = resave(tiny_llama, tmp_path / "src", bad)
    refused = cli("perturb", src, tmp_path / "refused")
    assert refused.exit_code == 2 and "'model.norm.weight' holds NaN or infinite" in refused.stderr
    assert not (tmp_path / "refused").exists()
    done = cli("perturb", src, tmp_path / "out", "--allow-nonfinite", "-q")
    assert done.exit_code == 0, done.output
    assert torch.isinf(load_weights(tmp_path / "out")["model.norm.weight"][3])
    # Noise that overflows a narrow dtype is named as such.
    half = resave(tiny_llama, tmp_path / "half", {k: v.half() for k, v in weights.items()})
    overflow = cli("perturb", half, tmp_path / "overflow", "--beta", "1e6")
    assert overflow.exit_code == 2 and "the noise overflows F16" in overflow.stderr
    help_text = cli("perturb", "--help").output
    assert "--allow-nonfinite" in help_text
