"""The data module: packing, prompt masking, mixing, determinism, sharding, errors."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from undo_cli.data import (
    IGNORE_INDEX,
    BatchStream,
    build_stream,
    collate,
    encode_prompt_completion,
    load_source,
    parse_data_specs,
)
from undo_cli.errors import DataError, UsageError

DOCS = ["1 + 2 = 3", "a much longer document about numbers and words", "x", "",
        "twelve times seven is eighty four", "9 - 4 = 5", "the end."]


def take(stream: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(n)]


def test_packing_has_no_padding_and_keeps_document_boundaries(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    block = 8
    stream = build_stream(tok, [str(path)], block, 2, seed=3, packing="concat")
    # Each document is its tokens (BOS first: the char tokenizer adds it) and one EOS.
    epoch = sum(len(tok(d)["input_ids"]) + 1 for d in DOCS)
    n_batches = -(-epoch // (block * 2)) * 3  # a few epochs
    batches = take(stream, n_batches)
    for b in batches:
        assert b["input_ids"].shape == (2, block)
        assert bool(b["attention_mask"].all())  # no padding anywhere
        assert torch.equal(b["labels"], b["input_ids"])
        assert stream.last_tokens == 2 * block
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    eos = tok.eos_token_id
    # Epoch by epoch, the stream is every document exactly once, each followed by EOS.
    expected = Counter(tuple(tok(d)["input_ids"]) for d in DOCS)
    for e in range(3):
        chunk = flat[e * epoch:(e + 1) * epoch]
        assert chunk[-1] == eos
        docs, cur = [], []
        for t in chunk:
            if t == eos:
                docs.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        assert Counter(docs) == expected
    # ... and epochs are reshuffled.
    assert flat[:epoch] != flat[epoch:2 * epoch]


def test_text_blocks_straddle_epochs_without_a_gap(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])  # BOS a b c EOS per epoch
    stream = build_stream(tok, [str(path)], 10, 1, seed=0, packing="concat")
    ids = next(stream)["input_ids"][0].tolist()
    abc = tok("abc")["input_ids"] + [tok.eos_token_id]
    assert ids == (abc * 3)[:10]


def test_prompt_masking_is_exact(tmp_path, tok):
    rows = [{"prompt": "12 * 7 =", "completion": " 84"}, {"prompt": "what is 2+2?", "answer": 4}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    stream = build_stream(tok, [str(path)], 64, 2, seed=0)
    batch = next(stream)
    seen = set()
    for row in range(2):
        mask = batch["attention_mask"][row]
        n = int(mask.sum())
        ids = batch["input_ids"][row, :n].tolist()
        labels = batch["labels"][row].tolist()
        rec = next(r for r in rows
                   if tok.decode(ids, skip_special_tokens=True).startswith(r["prompt"]))
        seen.add(rec["prompt"])
        completion = str(rec.get("completion", rec.get("answer")))
        p = len(tok(rec["prompt"])["input_ids"])
        c = len(tok(completion, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert n == p + c
        assert labels[:p] == [IGNORE_INDEX] * p  # prompt masked
        assert labels[p:n] == ids[p:n]  # completion (and EOS) trained on
        assert ids[-1] == tok.eos_token_id
        assert labels[n:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)  # padding masked
        assert mask[:n].all() and not mask[n:].any()
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        # The same ids and labels as the helper shared with evaluation.
        assert (ids, labels[:n]) == encode_prompt_completion(tok, rec["prompt"], completion)
    assert seen == {r["prompt"] for r in rows}
    # Dynamic padding: the batch is as wide as its longest example, no wider.
    assert int(batch["attention_mask"].sum(1).max()) == batch["input_ids"].shape[1]


def test_collate_right_pads():
    b = collate([(np.array([5, 6, 7]), None, None),
                 (np.array([8]), np.array([IGNORE_INDEX]), None),
                 (np.array([4, 9]), None, np.array([0, 0]))], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [4, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3, [4, 9, IGNORE_INDEX]]
    # Positions: given ones kept, padding continues the row's last document.
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 1]]


def test_mixing_follows_weights(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "a"}] * 5)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "completion": "bb"}] * 7)
    stream = build_stream(tok, [f"{a}:0.75", f"{b}:0.25"], 16, 50, seed=1)
    widths = Counter()
    for batch in take(stream, 40):
        widths.update(batch["attention_mask"].sum(1).tolist())
    wa = len(tok("a")["input_ids"]) + 2  # prompt (with BOS) + "a" + EOS
    wb = len(tok("b")["input_ids"]) + 3  # prompt (with BOS) + "bb" + EOS
    share = widths[wa] / (widths[wa] + widths[wb])
    assert abs(share - 0.75) < 0.03
    assert stream.describe()[0]["weight"] == pytest.approx(0.75)


def test_streams_are_deterministic_and_resumable(tmp_path, tok):
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{i} =", "completion": str(i)}
                                             for i in range(9)])
    specs = [f"{t}:0.5", f"{pc}:0.5"]
    one = take(build_stream(tok, specs, 12, 3, seed=5), 12)
    two = take(build_stream(tok, specs, 12, 3, seed=5), 12)
    other = take(build_stream(tok, specs, 12, 3, seed=6), 12)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, two, strict=True))
    assert not all(x["input_ids"].shape == y["input_ids"].shape
                   and torch.equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(one, other, strict=True))
    # Resuming at a position gives exactly the batches an uninterrupted stream gives.
    resumed = build_stream(tok, specs, 12, 3, seed=5)
    resumed.load_state_dict({"position": 7})
    for x, y in zip(one[7:], take(resumed, 5), strict=True):
        for k in x:
            assert torch.equal(x[k], y[k])


def test_sharding_splits_the_global_batch(tmp_path, tok):
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{i} =", "completion": str(i)}
                                             for i in range(9)])
    specs = [str(t), str(pc)]
    whole = build_stream(tok, specs, 16, 4, seed=2)
    halves = [build_stream(tok, specs, 16, 2, seed=2) for _ in range(2)]
    for rank, s in enumerate(halves):
        s.shard(rank, 2)
    for _ in range(6):
        w = next(whole)
        parts = [next(s) for s in halves]
        assert all(s.last_tokens == whole.last_tokens for s in halves)
        for row in range(4):
            part, r = parts[row // 2], row % 2
            n = int(w["attention_mask"][row].sum())
            assert torch.equal(w["input_ids"][row, :n], part["input_ids"][r, :n])
            assert torch.equal(w["labels"][row, :n], part["labels"][r, :n])


def test_tokens_per_batch_is_exact_for_text(tmp_path, tok):
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    stream = build_stream(tok, [str(t)], 16, 3, seed=0, packing="concat")
    assert stream.tokens_per_batch() == 48
    stream.shard(1, 2)
    assert stream.tokens_per_batch() == 96  # global: both processes


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "datasets"])
def test_other_formats_give_the_same_tokens(tmp_path, tok, fmt):
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(6)]
    ref = load_source(tok, write_jsonl(tmp_path / "r.jsonl", rows), max_length=32)
    if fmt == "json":
        path = tmp_path / "r.json"
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path = tmp_path / "r.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "r.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    src = load_source(tok, path, max_length=32)
    assert [x.tolist() for x in src.ids] == [x.tolist() for x in ref.ids]
    assert [x.tolist() for x in src.labels] == [x.tolist() for x in ref.labels]


def test_weighted_specs():
    assert parse_data_specs(["a.jsonl:0.75", ("b.jsonl", 0.25), "c.jsonl"]) == [
        ("a.jsonl", 0.75), ("b.jsonl", 0.25), ("c.jsonl", 1.0)]
    assert parse_data_specs(["C:/data/x.jsonl"]) == [("C:/data/x.jsonl", 1.0)]
    with pytest.raises(UsageError, match="positive"):
        parse_data_specs(["a.jsonl:-1"])


def _error(tmp_path, tok, name: str, content: str, **kw) -> str:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises((DataError, UsageError)) as err:
        build_stream(tok, [str(path)], kw.get("max_length", 16), 2)
    return str(err.value)


def test_bad_data_errors_name_file_and_line(tmp_path, tok):
    msg = _error(tmp_path, tok, "a.jsonl", '{"text": "ok"}\n{"txt": "no"}\n')
    assert "a.jsonl:2:" in msg and "expected 'text'" in msg
    msg = _error(tmp_path, tok, "b.jsonl", '{"text": "ok"}\n{not json\n')
    assert "b.jsonl:2:" in msg and "not valid JSON" in msg
    msg = _error(tmp_path, tok, "c.jsonl", "")
    assert "c.jsonl" in msg and "empty" in msg
    msg = _error(tmp_path, tok, "d.txt", "hello")
    assert "d.txt" in msg and "unknown data format" in msg
    msg = _error(tmp_path, tok, "e.jsonl", '{"prompt": "1 =", "completion": "1"}\n'
                 + json.dumps({"prompt": "x" * 40, "completion": "y"}) + "\n")
    assert "e.jsonl:2:" in msg and "longer than --max-length 16" in msg and "cannot be split" in msg
    msg = _error(tmp_path, tok, "f.jsonl",
                 '{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    assert "f.jsonl" in msg and "training data needs" in msg
    msg = _error(tmp_path, tok, "g.jsonl", '{"text": "ok"}\n{"text": null}\n')
    assert "g.jsonl:2:" in msg
    msg = _error(tmp_path, tok, "h.jsonl", '{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n')
    assert "h.jsonl:2:" in msg and "one shape per file" in msg
    with pytest.raises(UsageError, match="not found"):
        build_stream(tok, [str(tmp_path / "missing.jsonl")], 16, 2)
    # A long *text* document is fine: it is split across blocks.
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "z" * 100}])
    assert next(build_stream(tok, [str(path)], 16, 2))["input_ids"].shape == (2, 16)


def test_tokenizer_without_eos_or_pad_falls_back(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abc ")}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    bare = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert bare.eos_token_id is None and bare.pad_token_id is None
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": "cab"}])
    with caplog.at_level("INFO", logger="undo_cli"):
        batch = next(build_stream(bare, [str(path)], 8, 1))
    assert bare.eos_token_id is not None and bare.pad_token_id == bare.eos_token_id
    assert batch["input_ids"].shape == (1, 8)
    assert "no EOS token" in caplog.text  # a note through logging (the CLI shows it)


# ----------------------------------------------------------------------------- resources


def test_long_texts_are_tokenised_in_pieces_with_the_same_ids(tok, tmp_path, monkeypatch):
    from undo_cli.data import encode_text, sources

    text = " ".join(f"{a} + {b} = {a + b}" for a in range(40) for b in range(20))
    one_call = tok(text)["input_ids"]
    monkeypatch.setattr(sources, "TEXT_PIECE_CHARS", 97)
    assert sources._pieces(text, 97)[1][0] == " "  # cut before a space
    assert encode_text(tok, text, special=True) == one_call  # BOS once, at the front
    assert encode_text(tok, text, special=False) == tok(text, add_special_tokens=False)[
        "input_ids"]
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "1 + 1 = 2"}])
    source = load_source(tok, path, max_length=64)
    assert source.docs[0].tolist() == [*one_call, tok.eos_token_id]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": text[:500], "completion": " x"}])
    ids, labels = encode_prompt_completion(tok, text[:500], " x")
    assert ids == tok(text[:500])["input_ids"] + tok(" x", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert load_source(tok, pairs, max_length=600).ids[0].tolist() == ids


_MEASURE = """
import json, resource, sys
from undo_cli.modelfactory import build_char_tokenizer
from undo_cli.data import load_source
tok = build_char_tokenizer(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = load_source(tok, sys.argv[1], max_length=64)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_mb": grown / 1024, "tokens": source.epoch_tokens}))
"""


def test_one_huge_record_is_tokenised_in_bounded_memory(tmp_path):
    """A 2 MB record tokenised in one call took ~400 MB (a tokenizer's output is ~200 times
    its input); in pieces, what remains is the ids themselves."""
    import subprocess
    import sys

    from conftest import TEST_ALPHABET

    size = 2_000_000
    text = ("12 + 7 = 19 and so on " * (size // 22 + 1))[:size]
    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": text}])
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), TEST_ALPHABET],
                          capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout)
    assert report["tokens"] == size + 2  # BOS and EOS
    assert report["grown_mb"] < 150, report  # ids: 8 bytes a token, plus a list while built
