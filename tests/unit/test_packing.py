"""Document-aware packing: rows of whole documents that never see each other.

The model-level checks run on every architecture `undo init` offers: a packed batch gives each
document exactly the logits and the loss it gets alone, and its gradient equals that of the
same documents padded one per row.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.data import (
    IGNORE_INDEX,
    best_fit_rows,
    build_stream,
    collate,
    fit_packing,
    model_inputs,
    packing_supported,
    unpack_documents,
)
from undo_cli.errors import UsageError

ARCHS = ("llama", "gemma2", "gpt2", "qwen2")
DOCS = ["1 + 2 = 3", "a much longer document about numbers and words", "x", "",
        "twelve times seven is eighty four", "9 - 4 = 5", "the end.", "7 * 6 = 42"]





def documents_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The documents of a batch, split where position ids restart (padding dropped)."""
    docs = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids, pos = batch["input_ids"][row, :n].tolist(), batch["position_ids"][row, :n].tolist()
        for t, p in zip(ids, pos, strict=True):
            if p == 0:
                docs.append([])
            docs[-1].append(t)
    return docs


def test_documents_mode_keeps_whole_documents_apart(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    block = 24
    stream = build_stream(tok, [str(path)], block, 1, seed=3)
    encoded = [tok(d)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    assert max(len(e) for e in encoded) > block  # one document must be cut into pieces
    pieces = Counter(tuple(e[i:i + block]) for e in encoded for i in range(0, len(e), block))
    epoch_rows = int(stream.sources[0].items_per_epoch)
    seen: Counter = Counter()
    for _ in range(epoch_rows):
        batch = next(stream)
        assert batch["input_ids"].shape[1] <= block
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            pos = batch["position_ids"][row, :n]
            labels = batch["labels"][row, :n]
            ids = batch["input_ids"][row, :n]
            starts = (pos == 0).nonzero().flatten().tolist()
            assert starts[0] == 0
            # Labels equal the ids except at each document's first token.
            keep = torch.ones(n, dtype=torch.bool)
            keep[starts] = False
            assert torch.equal(labels[keep], ids[keep])
            assert bool((labels[starts] == IGNORE_INDEX).all())
            # Positions count up by one inside a document.
            for a, b in zip(starts, [*starts[1:], n]):
                assert pos[a:b].tolist() == list(range(b - a))
        seen.update(tuple(d) for d in documents_of(batch))
    assert seen == pieces  # the first epoch's rows hold every piece exactly once
    assert sum(len(p) * c for p, c in pieces.items()) == stream.sources[0].epoch_tokens


def test_documents_mode_wastes_little_and_counts_rows(tmp_path, tok):
    rows = [{"text": f"{a} * {b} = {a * b}"} for a in range(30) for b in range(7)]
    path = write_jsonl(tmp_path / "eq.jsonl", rows)
    source = build_stream(tok, [str(path)], 64, 4, seed=0).sources[0]
    rows_per_epoch = source.items_per_epoch
    fill = source.epoch_tokens / (rows_per_epoch * 64)
    assert fill > 0.95  # best fit: rows are nearly full
    assert source.mean_item_tokens == pytest.approx(source.epoch_tokens / rows_per_epoch)
    # item_tokens agrees with the rows it describes.
    for k in range(0, 3 * int(rows_per_epoch), 7):
        assert source.item_tokens(k) == len(source.item(k)[0])


def test_best_fit_rows_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=400)
    order = rng.permutation(400)
    regrouped, offsets = best_fit_rows(lengths[order], 32, order)
    assert sorted(regrouped.tolist()) == list(range(400))  # every document, once
    sums = [int(lengths[regrouped[a:b]].sum()) for a, b in zip(offsets, offsets[1:])]
    assert max(sums) <= 32
    # Best fit: when a row was opened, no earlier open row had room for its first document.
    position = {int(d): i for i, d in enumerate(order)}
    firsts = [position[int(regrouped[a])] for a in offsets[:-1]]
    assert firsts == sorted(firsts)
    # Within 10% of the fewest rows possible (total length / capacity), on documents of up to
    # 29 tokens for rows of 32: the hard case for any packing.
    assert len(sums) <= 1.1 * -(-int(lengths.sum()) // 32)


def test_none_mode_is_one_document_per_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    stream = build_stream(tok, [str(path)], 16, 3, seed=1, packing="none")
    for _ in range(5):
        batch = next(stream)
        for row in range(3):
            n = int(batch["attention_mask"][row].sum())
            assert batch["position_ids"][row].tolist() == list(range(batch["input_ids"].shape[1]))
            assert n <= 16
        assert len(documents_of(batch)) == 3


def test_concat_mode_is_a_continuous_stream(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    batch = next(build_stream(tok, [str(path)], 16, 2, seed=0, packing="concat"))
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_unknown_packing_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ab"}])
    with pytest.raises(UsageError, match="--packing must be one of documents, concat, none"):
        build_stream(tok, [str(path)], 16, 2, packing="sometimes")


def test_packed_streams_resume_exactly(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d * 2} for d in DOCS])
    one = [next(s) for s in [build_stream(tok, [str(path)], 32, 2, seed=4)] for _ in range(9)]
    resumed = build_stream(tok, [str(path)], 32, 2, seed=4)
    resumed.load_state_dict({"position": 5})
    for x in one[5:]:
        y = next(resumed)
        assert all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------ the models honour it


def packed_batch(tok) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Two rows of whole documents (the second with padding at the end) and the documents."""
    docs = [tok(d)["input_ids"] + [tok.eos_token_id] for d in
            ("12 + 7 = 19", "3 * 4 = 12", "ab", "hello there", "9 / 3 = 3")]
    rows = [docs[:3], docs[3:]]
    items = []
    for row in rows:
        ids = np.concatenate([np.array(d) for d in row])
        labels = ids.copy()
        starts = np.cumsum([0] + [len(d) for d in row[:-1]])
        labels[starts] = IGNORE_INDEX
        pos = np.concatenate([np.arange(len(d)) for d in row])
        items.append((ids, labels, pos))
    return collate(items, tok.pad_token_id), docs


def load(path, arch=None):  # noqa: ARG001 - the architecture comes from the checkpoint
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float()


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("pack") / request.param, request.param)
    return request.param, path


def test_each_document_gets_the_logits_and_loss_it_gets_alone(arch_model, tok):
    arch, path = arch_model
    model = load(path, arch).eval()
    batch, docs = packed_batch(tok)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        packed_loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    total, count = 0.0, 0
    flat = [(r, c) for r in range(2) for c in range(int(batch["attention_mask"][r].sum()))]
    cursor = 0
    for doc in docs:
        ids = torch.tensor([doc])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
            loss = model(input_ids=ids, labels=ids).loss
        where = flat[cursor:cursor + len(doc)]
        cursor += len(doc)
        got = torch.stack([logits[r, c] for r, c in where])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5, msg=arch)
        total += float(loss) * (len(doc) - 1)
        count += len(doc) - 1
    assert float(packed_loss) == pytest.approx(total / count, rel=1e-5, abs=1e-6)


def test_a_packed_gradient_step_equals_the_padded_one(arch_model, tok):
    arch, path = arch_model
    batch, _ = packed_batch(tok)
    padded = unpack_documents(batch, tok.pad_token_id)
    assert padded["input_ids"].shape[0] == 5 and "position_ids" not in padded
    grads = []
    for b in (batch, padded):
        model = load(path, arch).eval()  # no dropout; gradients flow as in training
        model.config.use_cache = False
        loss = model(**model_inputs(b), labels=b["labels"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6,
                                   msg=f"{arch} {name}")


def test_every_preset_architecture_supports_packing(arch_model):
    arch, path = arch_model
    assert packing_supported(load(path, arch)), arch


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention ignores packed position ids (like old or custom code)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):  # noqa: ARG002
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_model_without_support_gets_one_document_per_row(tiny_llama, tmp_path, tok, caplog):
    broken = _IgnoresPositions(load(tiny_llama, "llama"))
    assert not packing_supported(broken)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    stream = build_stream(tok, [str(path)], 32, 2, seed=0)
    with caplog.at_level(logging.INFO, logger="undo_cli"):
        assert not fit_packing({"train": stream}, [broken])
    assert "row of its own" in caplog.text
    batch = next(stream)
    assert "position_ids" not in batch
    # Each row is one document (or a piece of a long one): a BOS only at its start.
    bos = tok.bos_token_id
    for _ in range(4):
        for row in batch["input_ids"]:
            assert (row == bos).nonzero().flatten().tolist() in ([], [0])
        batch = next(stream)
    assert stream.describe()[0]["packing"] == "documents-padded"
    # A supporting model leaves packing on.
    other = build_stream(tok, [str(path)], 32, 2, seed=0)
    assert fit_packing({"train": other}, [load(tiny_llama, "llama")])
    assert "position_ids" in next(other)


def test_unpacking_keeps_the_loss(tiny_llama, tok):
    model = load(tiny_llama, "llama").eval()
    batch, _ = packed_batch(tok)
    padded = unpack_documents(batch, tok.pad_token_id)
    with torch.no_grad():
        a = model(**model_inputs(batch), labels=batch["labels"]).loss
        b = model(**model_inputs(padded), labels=padded["labels"]).loss
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_packing_is_recorded(tmp_path, tiny_llama, cli):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    out = tmp_path / "trained"
    r = cli("train", out, "--init", tiny_llama, "--data", data, "--max-steps", "2",
            "--max-length", "32", "--batch-size", "2", "--packing", "none", "--quiet")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["arguments"]["packing"] == "none"
    assert manifest["data"]["train"][0]["packing"] == "none"
    r = cli("train", tmp_path / "x", "--init", tiny_llama, "--data", data, "--max-steps", "1",
            "--packing", "sometimes")
    assert r.exit_code == 2 and "--packing must be one of" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["npo", "maxent", "graddiff"])
def test_unlearning_losses_score_packed_documents_as_if_alone(tiny_llama, tok, method):
    from undo_cli.unlearn import UnlearnOptions, prepare_method

    model = load(tiny_llama).eval()
    batch, _ = packed_batch(tok)
    padded = unpack_documents(batch, tok.pad_token_id)
    setup = prepare_method(model, method, UnlearnOptions(), has_retain=False)
    with torch.no_grad():
        packed_loss, _ = setup.loss_fn(model, {"forget": batch})
        padded_loss, _ = setup.loss_fn(model, {"forget": padded})
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=1e-5, abs=1e-6)
