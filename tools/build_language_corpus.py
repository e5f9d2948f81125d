"""Build undo's built-in language corpus (`undo_cli/corpora/{english,korean}.jsonl`).

Both halves are real human-written, public-domain text that the package registries carry:

- English: Ambrose Bierce, *The Devil's Dictionary* (1911; public domain), from Debian's
  `dict-devil` package (`apt-get download dict-devil`): one document per dictionary entry.
- Korean: the Constitution of the Republic of Korea (1987) and ten National Assembly bills
  (2010), from the `kolaw` and `kobill` corpora shipped in the KoNLPy 0.6.0 wheel
  (`pip download --no-deps konlpy==0.6.0`). Statutes and bills are not protected works under
  Article 7 of the Korean Copyright Act. One document per constitutional article (the
  preamble and the addenda's articles included) and per bill section (the reasons for the
  bill; the amendment), with the PDF line wraps and page numbers removed and the side-by-side
  comparison tables dropped.

Usage: python tools/build_language_corpus.py DEVIL_DICT_DZ KONLPY_CORPUS_DIR OUT_DIR
(DEVIL_DICT_DZ: usr/share/dictd/devil.dict.dz from the .deb; KONLPY_CORPUS_DIR:
konlpy/data/corpus from the wheel). The output is deterministic.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path


def english_documents(dict_dz: Path) -> list[str]:
    text = gzip.decompress(dict_dz.read_bytes()).decode("utf-8")
    start = text.index("\nA\n") if "\nA\n" in text else text.index("ABASEMENT")
    body = text[start:]
    docs: list[str] = []
    current: list[str] = []
    entry = re.compile(r"^[A-Z][A-Z' .-]*[A-Z.]?(, [a-z. ]+)?[.,]? ")
    for line in body.splitlines():
        if re.fullmatch(r"[A-Z]", line.strip()):  # section letters
            continue
        starts = (entry.match(line) or re.fullmatch(r"[A-Z][A-Z' -]*\.", line.strip())) \
            and (not current or current[-1] == "")
        if starts and current and any(s.strip() for s in current):
            docs.append("\n".join(current).strip())
            current = []
        current.append(line.rstrip())
    if any(s.strip() for s in current):
        docs.append("\n".join(current).strip())
    return [d for d in docs if len(d) >= 20]


def _unwrap(text: str) -> str:
    """Undo the bills' PDF layout: a blank line after every printed line, page numbers."""
    text = text.replace("\x0c", "\n")
    text = re.sub(r"\n- \d+ -\n", "\n", text)
    lines = [line for line in text.split("\n") if line.strip()]
    paragraphs: list[str] = []
    for line in lines:
        new_paragraph = (not paragraphs or line.startswith(" ") or re.match(
            r"(제\d+조|제안이유|주요내용|부\s*칙|법률\s+제|[가-하]\. |\d+\. |[①-⑳])", line))
        if new_paragraph:
            paragraphs.append(line.strip())
        else:
            paragraphs[-1] += line.rstrip() if paragraphs[-1].endswith(" ") else line.strip()
    return "\n".join(re.sub(r"[ \t]{2,}", " ", p).strip() for p in paragraphs)


def korean_documents(corpus: Path) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    constitution = (corpus / "kolaw" / "constitution.txt").read_text(encoding="utf-8")
    constitution = constitution.replace(" 펼침  부칙 <헌법 제10호, 1987.10.29.>  부칙보기",
                                        "부칙 <헌법 제10호, 1987.10.29.>")
    pieces = re.split(r"\n(?=\s*제\d+조 )", constitution)
    for piece in pieces:
        piece = "\n".join(line.strip() for line in piece.strip().splitlines() if line.strip())
        if piece:
            docs.append(("kolaw/constitution.txt", piece))
    for path in sorted((corpus / "kobill").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        text = re.split(r"신\s*[·ㆍ]\s*구\s*조문\s*대비표|\n신 ·\s*\n", text)[0]
        text = _unwrap(text)
        parts = re.split(r"\n(?=법률 제 호\n)", text)
        for part in parts:
            if part.strip():
                docs.append((f"kobill/{path.name}", part.strip()))
    return docs


def main() -> None:
    dict_dz, corpus, out = (Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "english.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for doc in english_documents(dict_dz):
            f.write(json.dumps({"text": doc, "source": "devils-dictionary"},
                               ensure_ascii=False) + "\n")
    with open(out / "korean.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for source, doc in korean_documents(corpus):
            f.write(json.dumps({"text": doc, "source": source}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
