"""The paper's language setting (`undo data language`): retain one language, forget another.

The paper pretrains on English (retain, FineWeb-Edu) and Korean (forget, FineWeb-2 `kor_Hang`)
and measures the forget language by the cross-entropy of held-out text. `language_task` splits
two corpora into that setting's files, each record `{"text": ...}`:

- `retain_train.jsonl`, `retain_eval.jsonl`: the retain language's documents;
- `forget_train.jsonl`, `forget_eval.jsonl`: the forget language's documents;
- `info.json`: the sources (each file's fingerprint, or the built-in corpus with its licence),
  the options, and documents and characters per file; `undo.json`.

The evaluation sets are held out by document, never by chunk: exact repeats of a document are
dropped (so none lands in both sets; `info.json` counts them), the documents are shuffled with
the seed and whole documents go to the evaluation set until it holds `eval_fraction` of the
language's characters (at least one document, never all). The training commands cut long
documents into rows themselves, and `undo eval` scores a long document in windows.

A corpus is any `--data` format whose records have a `text` field (JSON Lines, JSON, CSV,
Parquet, a saved `datasets` directory: one document per record), or a plain-text file (any
other suffix: one document per paragraph, paragraphs separated by blank lines). Without
corpora the built-in one is used (`undo_cli/corpora/README.md`): English from Bierce's *The
Devil's Dictionary* and Korean from the Constitution of the Republic of Korea and ten
National Assembly bills, all public domain and shipped with undo (nothing is downloaded).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from undo_cli.checkpoint import fingerprint_data
from undo_cli.errors import DataError, UsageError
from undo_cli.options.commands import LanguageOptions
from undo_cli.records import read_records, text_field
from undo_cli.synthetic_files import TaskData, generate_task

SPLITS = ("retain", "forget")
FILES = {f"{split}_{kind}": f"{split}_{kind}.jsonl" for split in SPLITS
         for kind in ("train", "eval")}
CORPORA = Path(__file__).parent / "corpora"
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
BUILTIN = {
    "retain": {
        "file": "english.jsonl", "language": "English",
        "what": "Ambrose Bierce, The Devil's Dictionary (1911), one document per entry",
        "source": "Debian package dict-devil 1.0-13.1 (Internet Wiretap edition, 1993)",
        "licence": "public domain (copyright expired)",
    },
    "forget": {
        "file": "korean.jsonl", "language": "Korean",
        "what": "the Constitution of the Republic of Korea (1987), one document per article, "
                "and ten National Assembly bills (2010), one document per section",
        "source": "the kolaw and kobill corpora of the KoNLPy 0.6.0 wheel (PyPI)",
        "licence": "not protected works (Korean Copyright Act, Article 7)",
    },
}


def _plain_text_documents(path: Path) -> list[str]:
    """The paragraphs (blank-line separated) of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason})", path) from e
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path) from e
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]


def read_documents(path: str | Path) -> list[str]:
    """The documents of one corpus file (module doc); `DataError` naming the file when it
    holds no text."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"corpus not found: {path}")
    if path.is_dir() or path.suffix.lower() in RECORD_SUFFIXES:
        docs = [text_field(rec, "text").strip() for rec in read_records(path)]
    else:
        docs = _plain_text_documents(path)
    docs = [d for d in docs if d]
    if not docs:
        raise DataError("the corpus holds no text", path)
    return docs


def split_documents(docs: list[str], eval_fraction: float, seed: int,
                    max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """(train, eval) documents: shuffled by `seed`, cut to `max_chars` characters of whole
    documents, then whole documents held out for evaluation until they hold `eval_fraction`
    of the characters (at least one, never all). `DataError`-free: needs two documents."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen = [docs[i] for i in order]
    if max_chars is not None:
        kept, total = [], 0
        for doc in chosen:
            if total >= max_chars:
                break
            kept.append(doc)
            total += len(doc)
        chosen = kept
    total = sum(len(d) for d in chosen)
    held, n_eval = 0, 0
    while n_eval < len(chosen) - 1 and (n_eval == 0 or held < eval_fraction * total):
        held += len(chosen[n_eval])
        n_eval += 1
    return chosen[n_eval:], chosen[:n_eval]


def _corpus(split: str, paths: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """The documents of one language and the description of where they came from."""
    if not paths:
        builtin = BUILTIN[split]
        docs = read_documents(CORPORA / builtin["file"])
        return docs, [{"builtin": builtin["file"], **{k: v for k, v in builtin.items()
                                                      if k != "file"},
                       "fingerprint": fingerprint_data(CORPORA / builtin["file"])}]
    docs: list[str] = []
    sources = []
    for path in paths:
        found = read_documents(path)
        docs += found
        sources.append({"path": str(path), "documents": len(found),
                        "fingerprint": fingerprint_data(path)})
    return docs, sources


def language_records(options: LanguageOptions) -> TaskData:
    """The setting's records and `info.json` payload (module doc)."""
    records: dict[str, list[dict[str, Any]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    sources = {}
    for k, split in enumerate(SPLITS):
        corpus = options.retain_corpus if split == "retain" else options.forget_corpus
        found, sources[split] = _corpus(split, corpus)
        docs = list(dict.fromkeys(found))  # a repeated document would leak into both sets
        if len(docs) < 2:
            where = corpus[0] if corpus else CORPORA / BUILTIN[split]["file"]
            raise DataError(f"the {split} corpus holds {len(docs)} distinct document(s); a "
                            "training and an evaluation set need two at least", where)
        # Each language its own stream of the seed, so one corpus does not move the other.
        train, held = split_documents(docs, options.eval_fraction, options.seed * 2 + k,
                                      options.max_chars)
        for kind, part in (("train", train), ("eval", held)):
            key = f"{split}_{kind}"
            records[key] = [{"text": d} for d in part]
            sizes[key] = {"documents": len(part), "characters": sum(len(d) for d in part)}
        sizes[f"{split}_duplicates_dropped"] = len(found) - len(docs)
    settings = asdict(options)
    for key in ("retain_corpus", "forget_corpus"):
        settings[key] = [str(p) for p in settings[key]]
    info = {"task": "language", "options": settings, "sources": sources,
            "sizes": sizes,
            "note": "evaluation sets are held out by document; the forget metric is the "
                    "cross-entropy (loss) of forget_eval"}
    return TaskData(records=records, info=info)


def generate_language(out_dir: str | Path, options: LanguageOptions = LanguageOptions(), *,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the setting into `out_dir` atomically, with `undo.json`; the written paths (keys
    of `FILES`, plus `info`). Everything is read and checked before anything is written."""
    started = time.time()
    data = language_records(options)
    return generate_task(out_dir, "language", FILES, data, overwrite=overwrite, started=started,
                         ascii_only=False)
