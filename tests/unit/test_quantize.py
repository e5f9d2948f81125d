"""Round-to-nearest quantisation (`undo_cli.quantize`): error bounds, layers, no side effects."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_checkpoint

from undo_cli import quantize
from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.errors import UsageError


def _weights(rows: int = 12, cols: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[0, 5] = 50.0  # an outlier: its row gets a coarse step
    w[3] = 0.0  # an all-zero row
    return w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 8, 7, 64])
def test_error_is_within_half_a_step(bits, group_size):
    w = _weights()
    deq = quantize.quantize_dequantize(w, bits, group_size)
    assert deq.shape == w.shape and deq.dtype == w.dtype
    bound = quantize.error_bound(w, bits, group_size)
    assert torch.all((w - deq).abs() <= bound * (1 + 1e-6) + 1e-12)
    # the bound is max|w| / (2 * qmax) of the weight's group: a row, or G inputs of it
    top = quantize.qmax(bits)
    assert top == {8: 127, 4: 7}[bits]
    size = w.shape[1] if group_size is None else group_size
    for r in (0, 5, 11):
        for start in range(0, w.shape[1], size):
            block = w[r, start:start + size]
            expected = block.abs().max() / (2 * top)
            assert torch.allclose(bound[r, start:start + size], expected.expand(len(block)))
            # symmetric codes: every value is an integer multiple of the group's step
            step = block.abs().max() / top
            codes = deq[r, start:start + size] / step
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert codes.abs().max() <= top + 1e-4
    assert torch.equal(deq[3], torch.zeros_like(deq[3]))  # zeros stay zero


def test_eight_bits_is_finer_than_four_and_requantising_changes_nothing():
    w = _weights(seed=1)
    e8 = (w - quantize.quantize_dequantize(w, 8)).abs().max()
    e4 = (w - quantize.quantize_dequantize(w, 4)).abs().max()
    assert e8 < e4 / 10
    once = quantize.quantize_dequantize(w, 4, 8)
    assert torch.allclose(quantize.quantize_dequantize(once, 4, 8), once, atol=1e-6)


def test_bad_settings():
    with pytest.raises(UsageError, match="8 or 4"):
        quantize.quantize_dequantize(torch.ones(2, 2), 3)
    with pytest.raises(UsageError, match="--group-size"):
        quantize.quantize_dequantize(torch.ones(2, 2), 8, 0)


def test_llama_layers_exclude_the_output_head(tiny_llama):
    model = load_model(tiny_llama)
    names = [n for n, _, _ in quantize.quantizable_layers(model)]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_gpt2_conv1d_is_quantised_per_output_column(tiny_gpt2):
    model = load_model(tiny_gpt2)
    layers = quantize.quantizable_layers(model)
    assert len(layers) == 2 * 4 and all(transposed for _, _, transposed in layers)
    name, module, _ = layers[0]
    before = module.weight.detach().clone()  # (inputs, outputs)
    quantize.quantize_model(model, 4)
    after = module.weight.detach()
    bound = quantize.error_bound(before.t(), 4).t()
    assert torch.all((after - before).abs() <= bound * (1 + 1e-6) + 1e-12)
    head = model.get_output_embeddings().weight
    assert torch.equal(head, load_model(tiny_gpt2).get_output_embeddings().weight)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama that answers a toy task ("abc" -> "defg") perfectly, and the task file."""
    from undo_cli.data import build_stream
    from undo_cli.engine import TrainConfig, lm_loss, train

    root = tmp_path_factory.mktemp("quantize")
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"prompt": "".join(letters[(s + i) % 26] for i in range(3)),
             "completion": "".join(letters[(s + i) % 26] for i in range(3, 7))}
            for s in range(26)]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = make_checkpoint(root / "random")
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, lm_loss("t"), {"t": build_stream(tok, [str(data)], 16, 16, 0, name="t")},
              TrainConfig(lr=1e-2, max_steps=60, warmup_steps=5))
    finally:
        torch.set_num_threads(threads)
    return model, tok, data


def test_eight_bits_leave_metrics_nearly_unchanged_and_the_original_untouched(trained):
    from undo_cli.evaluate import evaluate_model, load_eval_set

    model, tok, data = trained
    sets = [load_eval_set("task", data, tok)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = evaluate_model(model, tok, sets)["task"]
    assert base["accuracy"] == 1.0
    q8, info8 = quantize.quantized_copy(model, 8)
    q4, info4 = quantize.quantized_copy(model, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched
    assert info8["layers"] == 14 and info8["parameters"] > 0
    assert 0 < info8["max_abs_change"] < info4["max_abs_change"]
    m8 = evaluate_model(q8, tok, sets)["task"]
    assert m8["accuracy"] == base["accuracy"]
    assert m8["loss"] == pytest.approx(base["loss"], rel=0.05, abs=1e-3)
    m4 = evaluate_model(q4, tok, sets)["task"]
    assert abs(m4["loss"] - base["loss"]) > abs(m8["loss"] - base["loss"])
