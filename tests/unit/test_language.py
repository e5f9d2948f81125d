"""`undo data language`: the paper's language setting split from two corpora, by document."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from undo_cli.language import BUILTIN, CORPORA, read_documents, split_documents

FILES = ("retain_train", "retain_eval", "forget_train", "forget_eval")


def _texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_builtin_setting_is_deterministic_per_seed_and_split_by_document(cli, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = cli("data", "language", tmp_path / name, "--seed", seed, "--json")
        assert result.exit_code == 0, result.stderr
    for f in (*FILES, "info"):
        suffix = ".json" if f == "info" else ".jsonl"
        assert ((tmp_path / "a" / (f + suffix)).read_bytes()
                == (tmp_path / "b" / (f + suffix)).read_bytes())
    assert _texts(tmp_path / "a" / "forget_eval.jsonl") != _texts(
        tmp_path / "c" / "forget_eval.jsonl")
    for split, builtin in BUILTIN.items():
        documents = list(dict.fromkeys(read_documents(CORPORA / builtin["file"])))
        train, held = (_texts(tmp_path / "a" / f"{split}_{k}.jsonl") for k in ("train", "eval"))
        # Whole documents, each exactly once, none in both sets.
        assert sorted(train + held) == sorted(documents)
        assert not set(train) & set(held)
        share = sum(map(len, held)) / sum(map(len, documents))
        assert 0.1 <= share < 0.1 + max(map(len, held)) / sum(map(len, documents))
    korean = "".join(_texts(tmp_path / "a" / "forget_train.jsonl"))
    assert sum("\uac00" <= ch <= "\ud7a3" for ch in korean) > 0.5 * len(korean.replace(" ", ""))
    info = json.loads((tmp_path / "a" / "info.json").read_text(encoding="utf-8"))
    assert info["sources"]["forget"][0]["licence"] and info["sizes"]["forget_eval"]["documents"]
    assert info["sources"]["retain"][0]["fingerprint"].startswith("blake3:")
    assert info["sizes"]["retain_duplicates_dropped"] == 2  # two entries the source repeats


def test_user_corpora_in_any_format(cli, tmp_path):
    retain = write_jsonl(tmp_path / "en.jsonl", [{"text": f"Document {i}. " * 5, "id": i}
                                                 for i in range(30)])
    forget = tmp_path / "ko.txt"
    forget.write_text("\n\n".join(f"문단 {i} 입니다." for i in range(12)) + "\n", "utf-8")
    result = cli("data", "language", tmp_path / "out", "--retain-corpus", retain,
                 "--forget-corpus", forget, "--eval-fraction", 0.25, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["records"]["forget_train"] + summary["records"]["forget_eval"] == 12
    assert summary["records"]["retain_train"] + summary["records"]["retain_eval"] == 30
    held = _texts(tmp_path / "out" / "forget_eval.jsonl")
    assert all(t.startswith("문단 ") and t.endswith("입니다.") for t in held)
    info = json.loads((tmp_path / "out" / "info.json").read_text(encoding="utf-8"))
    assert info["sources"]["forget"] == [{"path": str(forget), "documents": 12,
                                          "fingerprint": info["sources"]["forget"][0][
                                              "fingerprint"]}]


def test_split_holds_out_whole_documents_until_the_share_and_caps_characters():
    docs = [f"d{i}" + "x" * i for i in range(1, 21)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert sorted(train + held) == sorted(docs) and held
    total = sum(map(len, docs))
    assert sum(map(len, held)) >= 0.2 * total > sum(map(len, held[:-1]))
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    capped_train, capped_held = split_documents(docs, 0.2, seed=3, max_chars=40)
    kept = capped_train + capped_held
    assert sum(map(len, kept)) >= 40 > sum(map(len, kept)) - max(map(len, kept))
    assert split_documents(["a", "b"], 0.99, seed=0)[0]  # never everything held out


@pytest.mark.parametrize("content, message", [
    ("\n\n   \n", "holds no text"),
    ('{"text": ""}\n', "holds no text"),
    ('{"body": "x"}\n', "'text' is missing"),
    ("only one paragraph\n", "two at least"),
])
def test_a_corpus_without_usable_text_is_refused(content, message, cli, tmp_path):
    suffix = ".jsonl" if content.startswith("{") else ".txt"
    corpus = tmp_path / f"ko{suffix}"
    corpus.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    result = cli("data", "language", out, "--forget-corpus", corpus)
    assert result.exit_code == 2
    assert message in result.stderr and str(corpus) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--eval-fraction", "1"], "--eval-fraction"),
    (["--eval-fraction", "0"], "--eval-fraction"),
    (["--max-chars", "0"], "--max-chars"),
    (["--seed", "-1"], "--seed"),
    (["--retain-corpus", "missing.jsonl"], "not found"),
])
def test_bad_options_exit_2_and_write_nothing(args, message, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("data", "language", out, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not out.exists()
