"""The attack families of `undo relearn-attack` beyond finetuning (`undo_cli.relearn.families`),
each checked against an independent computation on a tiny model: pruning (sparsity, smallest
magnitudes, Wanda's scores), the library quantisers (the library's own dequantisation), the
soft prompt (only the prompt changes) and the attacker's FLOPs (the engine's accounting)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.data import build_stream
from undo_cli.evaluate import load_eval_set
from undo_cli.options import AttackConfig, EvalOptions, TrainConfig
from undo_cli.quantize import quantizable_layers, quantize_model_with
from undo_cli.relearn import run_attack
from undo_cli.relearn.prune import activation_norms, magnitude_prune_, wanda_prune_
from undo_cli.relearn.soft_prompt import attach_soft_prompt


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _matrices(model):
    return [(name, module.weight.t() if transposed else module.weight)
            for name, module, transposed in quantizable_layers(model)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    digits = "0123456789"
    rows = [{"prompt": (digits * 2)[i:i + 3], "completion": (digits * 2)[i + 3:i + 6]}
            for i in range(10)]
    return {"forget": write_jsonl(root / "forget.jsonl", rows),
            "benign": write_jsonl(root / "benign.jsonl",
                                  [{"text": f"the fox {c} ran."} for c in "abcdefgh"])}


def test_magnitude_pruning_zeroes_the_smallest_weights_at_the_sparsity(tiny_llama):
    model = load_model(tiny_llama)
    original = {n: w.detach().clone() for n, w in _matrices(model)}
    summary = magnitude_prune_(model, 0.4)
    assert summary["pruned"] > 0
    for name, w in _matrices(model):
        before = original[name]
        zero = w == 0
        assert int(zero.sum()) == math.floor(0.4 * w.numel())
        # every pruned weight is no larger than every kept one
        assert before[zero].abs().max() <= before[~zero].abs().min()
        assert torch.equal(w[~zero], before[~zero])


def test_wanda_prunes_the_smallest_weight_times_activation_norm_per_row(tiny_llama, tok):
    model = load_model(tiny_llama)
    rows = [torch.tensor(tok("12345 abc")["input_ids"]), torch.tensor(tok("9+8=17")["input_ids"])]
    # Independent: every layer's inputs captured whole, norms over all their tokens.
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: captured.setdefault(name, []).append(
            args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
        for name, module, _ in quantizable_layers(model)]
    with torch.no_grad():
        for r in rows:
            model(input_ids=r[None])
    for h in hooks:
        h.remove()
    norms = {n: torch.linalg.vector_norm(torch.cat(xs), dim=0) for n, xs in captured.items()}
    computed = activation_norms(model, rows)
    for name in norms:
        torch.testing.assert_close(computed[name], norms[name], rtol=1e-5, atol=1e-6)
    original = {n: w.detach().clone() for n, w in _matrices(model)}
    wanda_prune_(model, 0.5, computed)
    for name, w in _matrices(model):
        score = original[name].abs() * norms[name][None, :]
        k = math.floor(0.5 * w.shape[1])
        for row in range(w.shape[0]):
            pruned = set(torch.nonzero(w[row] == 0).flatten().tolist())
            assert len(pruned) == k
            expected = set(torch.argsort(score[row], stable=True)[:k].tolist())
            # ties aside, the pruned set is the k smallest scores
            assert score[row, sorted(pruned)].max() <= score[row, sorted(expected)].max() + 1e-7


@pytest.mark.parametrize("scheme", ["nf4", "int8", "int4"])
def test_library_quantisers_match_the_library_dequantisation(tiny_llama, scheme):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("optimum.quanto")
    model = load_model(tiny_llama)
    original = {n: w.detach().clone() for n, w in _matrices(model)}
    summary = quantize_model_with(model, scheme)
    assert summary["scheme"] == scheme and summary["layers"] == len(original)
    for name, w in _matrices(model):
        before = original[name]
        if scheme == "nf4":
            import bitsandbytes.functional as F

            q, state = F.quantize_4bit(before.contiguous(), blocksize=64, quant_type="nf4")
            expected = F.dequantize_4bit(q, state, quant_type="nf4")
        elif scheme == "int8":
            import bitsandbytes.functional as F

            codes, stats, _ = F.int8_vectorwise_quant(before.contiguous())
            expected = codes.float() * stats[:, None] / 127  # LLM.int8's row-wise absmax
        else:
            from optimum.quanto import qint4, quantize_weight
            from optimum.quanto.tensor.optimizers import MaxOptimizer

            group = 128 if before.shape[1] % 128 == 0 else before.shape[1]
            scale, shift = MaxOptimizer()(before, qint4, axis=0, group_size=group)
            expected = quantize_weight(before, qtype=qint4, axis=0, scale=scale, shift=shift,
                                       group_size=group, optimized=False).dequantize()
        torch.testing.assert_close(w.detach(), expected.reshape(w.shape), rtol=0, atol=1e-6)
        assert not torch.equal(w, before)  # it did quantise


def _stream(tok, path, max_length=32):
    return lambda seed, bs: build_stream(tok, [str(path)], max_length, bs, seed, name="attack")


def test_soft_prompt_changes_only_the_prompt_and_flops_follow_the_engine(tiny_llama, files):
    model = load_model(tiny_llama)
    tok = load_tokenizer(tiny_llama)
    sets = [load_eval_set("forget", files["forget"], tok)]
    config = AttackConfig(lrs=[1e-3], steps=4, train=TrainConfig(
        schedule="constant", max_steps=1, batch_size=4, eval_every=2), embedding_attack=4,
        prompt_tokens=3, prompt_lr=0.05)
    config.finetune = True
    kept: dict = {}
    before = copy.deepcopy(model.state_dict())
    results = run_attack(model, tok, sets, config, forget_metric="forget.loss",
                         make_stream=_stream(tok, files["forget"]), evals=EvalOptions(),
                         on_model=lambda run, m: kept.setdefault(run["attack"], m))
    emb = next(r for r in results["runs"] if r["attack"] == "embedding")
    attacked = kept["embedding"]
    prompt = attacked.get_input_embeddings().prompt
    _, ids = attach_soft_prompt(model, 3, emb["seed"])
    init = attach_soft_prompt(model, 3, emb["seed"])[0].get_input_embeddings().prompt
    assert ids == list(range(model.get_input_embeddings().weight.shape[0],
                             model.get_input_embeddings().weight.shape[0] + 3))
    assert not torch.allclose(prompt, init)  # the prompt trained
    for name, tensor in attacked.state_dict().items():  # every weight as it was
        if name.endswith("prompt"):
            continue
        assert torch.equal(tensor, before[name.replace("embed_tokens.base.", "embed_tokens.")])
    for name, tensor in model.state_dict().items():  # the attacked model left alone
        assert torch.equal(tensor, before[name])
    # The engine's accounting: (2P + 2P_backward + 2P_trained) per token, the backward pass
    # reaching the prompt through every layer (all but the embedding matrix before it).
    params = {id(p): p for p in attacked.parameters()}
    total = sum(p.numel() for p in params.values())
    embedding = attacked.get_input_embeddings().base.weight.numel()
    tied = attacked.get_output_embeddings().weight is attacked.get_input_embeddings().base.weight
    backward = total - (0 if tied else embedding)
    per_token = 2 * total + 2 * backward + 2 * prompt.numel()
    assert emb["trainable_parameters"] == prompt.numel() == 3 * 32
    assert emb["flops"] == pytest.approx(per_token * emb["tokens"])
    assert [c["step"] for c in emb["cost"]] == [c["step"] for c in emb["curve"]] == [0, 2, 4]
    last = results["worst_case"][-1]  # the worst case carries its configuration's cost
    source = next(r for r in results["runs"] if r["config"] == last["config"])
    assert last["attacker_flops"] == pytest.approx(source["cost"][-1]["flops"])
    assert emb["cost"][-1]["flops"] == pytest.approx(emb["flops"])
    assert emb["cost"][-1]["tokens"] == emb["tokens"]
    assert emb["curve"][-1]["forget.loss"] < emb["curve"][0]["forget.loss"]
    # a plain finetuning run: 6P per token, its cost at every evaluation
    ft = next(r for r in results["runs"] if r["attack"] == "finetune")
    p = sum(x.numel() for x in {id(x): x for x in model.parameters()}.values())
    assert ft["flops"] == pytest.approx(6 * p * ft["tokens"])
    assert ft["cost"][1]["flops"] == pytest.approx(6 * p * ft["cost"][1]["tokens"])
    assert 0 < ft["cost"][1]["tokens"] < ft["cost"][2]["tokens"] == ft["tokens"]


def test_every_family_is_its_own_run_in_one_results_json(cli, tiny_llama, files, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "res"
    r = cli("relearn-attack", tiny_llama, "--out", out, "--data", files["forget"],
            "--eval", f"forget={files['forget']}", "--lrs", "1e-3", "--steps", "2",
            "--eval-every", "1", "--batch-size", "4", "--prune", "wanda:0.5",
            "--quantize", "int8", "--qlora", "--lora", "--lora-rank", "4",
            "--benign-data", files["benign"], "--embedding-attack", "2",
            "--prompt-tokens", "2", "--no-plot")
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    attacks = [(run["attack"], bool(run.get("quantize"))) for run in results["runs"]]
    assert attacks == [("finetune", False), ("finetune", True), ("prune", False),
                       ("prune+finetune", False), ("prune+finetune", True),
                       ("quantize", True), ("qlora", False),
                       ("benign-finetune", False), ("benign-finetune", True),
                       ("embedding", False)]
    configs = {run["config"] for run in results["runs"]}
    assert len(configs) == 7  # quantised twins share their source's configuration name
    assert results["attack"]["prune"] == {"method": "wanda", "sparsity": 0.5}
    assert results["attack"]["quantize"]["scheme"] == "int8"
    assert results["attack"]["benign_data"] == [str(files["benign"])]
    assert results["attack"]["embedding_attack"]["prompt_tokens"] == 2
    for run in results["runs"]:
        assert [c["step"] for c in run["cost"]] == [c["step"] for c in run["curve"]]
    pruned = next(run for run in results["runs"] if run["attack"] == "prune")
    assert pruned["prune"]["calibration_rows"] > 0
    assert [c["step"] for c in pruned["curve"]] == [0]
    # the benign runs trained on the benign file: their tokens are its first two batches'
    tok = load_tokenizer(tiny_llama)
    stream = build_stream(tok, [str(files["benign"])], results["attack"]["max_length"], 4, 0,
                          name="benign", packing=results["attack"]["packing"])
    expected = sum(int(next(stream)["attention_mask"].sum()) for _ in range(2))
    benign = next(run for run in results["runs"] if run["attack"] == "benign-finetune")
    forget = next(run for run in results["runs"] if run["attack"] == "finetune")
    assert benign["tokens"] == expected != forget["tokens"]
    original = next(run for run in results["runs"] if run["attack"] == "quantize")
    assert original["config"] == "original" and original["static"]
    assert original["quantize"]["library"] == "bitsandbytes"


def test_family_options_are_checked_before_loading(cli, tiny_llama, files, tmp_path):
    for args, message in (
            (["--prune", "wanda:1.5"], "--prune must be"),
            (["--prune", "random:0.5"], "--prune must be"),
            (["--quantize", "fp8"], "--quantize must be"),
            (["--qlora"], "--qlora needs --quantize"),
            (["--quantize", "nf4", "--group-size", "64"], "--group-size applies")):
        r = cli("relearn-attack", tiny_llama, "--out", tmp_path / "x", "--data",
                files["forget"], "--eval", f"forget={files['forget']}", *args)
        assert r.exit_code == 2, r.output
        assert message in r.output
    r = cli("relearn-attack", tiny_llama, "--out", tmp_path / "x", "--eval",
            f"forget={files['forget']}", "--embedding-attack", "2")
    assert r.exit_code == 2 and "--embedding-attack optimises" in r.output


def test_saved_qlora_model_and_soft_prompt(cli, tiny_llama, files, tmp_path):
    """--save-models: a QLoRA run as the merged quantised model (it measures what the run
    measured), a soft prompt as its tensor alone."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from undo_cli.evaluate import evaluate_model, flatten_metrics

    out = tmp_path / "saved"
    r = cli("relearn-attack", tiny_llama, "--out", out, "--data", files["forget"],
            "--eval", f"forget={files['forget']}", "--forget-metric", "forget.loss",
            "--lrs", "1e-2", "--steps", "2", "--eval-every", "2", "--batch-size", "4",
            "--quantize", "int8", "--qlora", "--lora-rank", "4", "--embedding-attack", "2",
            "--prompt-tokens", "2", "--save-models", "--no-plot")
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    qlora = next(run for run in results["runs"] if run["attack"] == "qlora")
    model = load_model(out / qlora["saved_as"])
    tok = load_tokenizer(tiny_llama)
    measured = flatten_metrics(evaluate_model(model, tok, [load_eval_set(
        "forget", files["forget"], tok)]))
    assert measured["forget.loss"] == pytest.approx(qlora["curve"][-1]["forget.loss"],
                                                    rel=1e-4)
    emb = next(run for run in results["runs"] if run["attack"] == "embedding")
    prompt = load_file(str(out / emb["saved_as"] / "soft_prompt.safetensors"))["prompt"]
    assert tuple(prompt.shape) == (2, 32)


def test_the_soft_prompt_gradient_is_bit_identical_across_repeats_on_two_threads():
    """Every row of a batch adds to the same prompt vectors: the sum must not depend on the
    order threads finish in (an indexing backward's did, so one seed gave prompts differing
    in the 8th digit from run to run)."""
    from undo_cli.relearn.soft_prompt import SoftPromptEmbedding

    torch.manual_seed(0)
    vocab, n, width = 20, 8, 128
    layer = SoftPromptEmbedding(torch.nn.Embedding(vocab, width), n, torch.randn(n, width))
    ids = torch.cat([torch.arange(vocab, vocab + n).repeat(64, 1),
                     torch.randint(0, vocab, (64, 5))], 1)
    upstream = torch.randn(64, n + 5, width)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            layer.prompt.grad = None
            (layer(ids) * upstream).sum().backward()
            grads.append(layer.prompt.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    # and it is the sum over the rows of each prompt position's upstream gradient
    expected = upstream[:, :n].double().sum(0)
    assert torch.allclose(grads[0].double(), expected, atol=1e-4)
