"""Structured option text parsed once, when a group is built (parse, don't validate).

Each typed value is the text the user gave (a `str`, so that `undo.json` and `--json` record it
exactly as before) carrying what it means: `ByteSize.bytes`, `LayerRange.layers`,
`Pattern.regex`, `TokenizerSpec.kind`, `NamedPath.name` and `.path`, `ModuleNames.modules`,
and for the gate language (`undo_cli.gates`) `Condition.expr` (`--fail-if`),
`KeepBest.objective` (`--keep-best`), `StopWhen.condition` (`--stop-when`). The
`option(parse=...)` hooks below turn plain text into them, name the flag in the error, and
return an already typed value as it is (building a group twice, as `dataclasses.replace`
does, parses nothing again).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.gates import Expr, Objective, StopCondition, parse_gates, parse_objective


class ByteSize(str):
    """`--max-shard-size` text (`2GB`, `500MiB`, `1234`) with its number of bytes."""

    bytes: int


class LayerRange(str):
    """Decoder-layer text (`10-15`, `0,2,4-6`, `all`) with its 0-based layers (`None`: all)."""

    layers: tuple[int, ...] | None


class Pattern(str):
    """A regular expression as given, with its compiled `regex` (`re.search` on names)."""

    regex: re.Pattern


class NamedPath(str):
    """A `NAME=PATH` value as given (`--eval`, `probe --data`) with its `name` and `path`; a
    bare PATH is named after its file's stem."""

    name: str
    path: str


class ModuleNames(str):
    """`--lora-targets` as given, with its `modules`: peft's shorthand "all-linear", or the
    module names of `q_proj,v_proj` as a list."""

    modules: str | list[str]


class TokenizerSpec(str):
    """`--tokenizer` text with what it names: `kind` "char" (`alphabet` its characters, None:
    printable ASCII), "bpe" (`size` tokens, trained on `--tokenizer-data`) or "path" (a
    tokenizer.json file or a directory holding a tokenizer)."""

    kind: str
    alphabet: str | None = None
    size: int | None = None


class Condition(str):
    """A `--fail-if` condition as given, with its parsed `expr` (`undo_cli.gates.Expr`)."""

    expr: Expr


class KeepBest(str):
    """`--keep-best` as given (`retain.accuracy`, `max r.acc - f.acc`), with its `objective`."""

    objective: Objective


class StopWhen(str):
    """`--stop-when` as given, with its `condition` (`undo_cli.gates.StopCondition`)."""

    condition: StopCondition


def size_in_bytes(text: str | int, flag: str | None = None) -> int:
    """`"2GB"` -> 2_000_000_000, `"500MiB"` -> 524_288_000, `"1234"` -> 1234 (bytes);
    `UsageError` (naming `flag` if given) for anything else or a size below one byte."""
    if isinstance(text, ByteSize):
        return text.bytes
    where = f"{flag} " if flag else ""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if not m:
            raise UsageError(f"{where}cannot read size {text!r}: expected e.g. 2GB, 500MB, "
                             "1GiB or a number of bytes")
        number, unit = float(m.group(1)), m.group(2)
        unit = unit if unit.endswith("B") or not unit else unit + "B"
        base = 1024 if "I" in unit else 1000
        power = {"": 0, "B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4,
                 "KIB": 1, "MIB": 2, "GIB": 3, "TIB": 4}.get(unit)
        if power is None:
            raise UsageError(f"{where}cannot read size {text!r}: unknown unit {unit}")
        size = int(number * base**power)
    if size < 1:
        raise UsageError(f"{where}size {text!r} must be positive")
    return size


def layer_numbers(text: str | None, flag: str = "--layers") -> tuple[int, ...] | None:
    """`"10-15"` -> (10, ..., 15); `"0,2,4-5"` -> (0, 2, 4, 5); `"all"`, "" or None -> None
    (every layer). `UsageError` naming `flag` for anything else (negative numbers, a range
    whose end is below its start)."""
    if isinstance(text, LayerRange):
        return text.layers
    if text is None or not str(text).strip() or str(text).strip().lower() == "all":
        return None
    chosen: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise UsageError(f"{flag} {text!r}: expected layer numbers and ranges such as "
                             "10-15 or 0,2,4-6 (0-based), or all")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise UsageError(f"{flag} {text!r}: the range {part} ends before it starts")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise UsageError(f"{flag} {text!r} selects no layer")
    return tuple(sorted(chosen))


def compile_pattern(flag: str, pattern: str) -> re.Pattern:
    """`pattern` compiled, or a `UsageError` naming `flag` for an invalid regular expression."""
    if isinstance(pattern, Pattern):
        return pattern.regex
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{flag} {pattern!r} is not a valid regular expression ({e})") from e


# A byte-level BPE holds undo's 4 special tokens (<pad> <eos> <bos> <unk>) and the 256 bytes.
BPE_MIN_VOCAB = 4 + 256
BPE_MAX_VOCAB = 1_000_000
TOKENIZER_KINDS = "'char', 'char:ALPHABET', 'bpe:N', a tokenizer.json file or a directory"
BPE_NEEDS_DATA = ("--tokenizer bpe:N needs --tokenizer-data FILE (repeatable): the records to "
                  "train it on")


def decode_alphabet(text: str) -> str:
    """The characters of a `char:ALPHABET` spec: any Unicode characters as written, with
    backslash escapes (`\\n`, `\\u00e4`, `\\\\`) decoded. `UsageError` for a broken escape."""
    if "\\" not in text:
        return text
    try:  # non-Latin-1 characters become escapes first, so unicode_escape keeps them intact
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UsageError(f"--tokenizer char:{text}: a broken backslash escape ({e.reason})") from e


def tokenizer_spec(text: Any) -> TokenizerSpec:
    """The `parse` hook of `--tokenizer`: `char`, `char:ALPHABET`, `bpe:N` (N within
    `BPE_MIN_VOCAB` .. `BPE_MAX_VOCAB`), or an existing tokenizer.json file or directory;
    `UsageError` for anything else. A `TokenizerSpec` is returned as it is."""
    if isinstance(text, TokenizerSpec):
        return text
    spec = TokenizerSpec(text)
    if text == "char":
        spec.kind = "char"
    elif text.startswith("char:"):
        spec.kind, spec.alphabet = "char", decode_alphabet(text[len("char:"):])
    elif text.startswith("bpe:"):
        size = text[len("bpe:"):]
        if not size.isdigit():
            raise UsageError(f"--tokenizer {text!r}: expected bpe:N with N the vocabulary size")
        if not BPE_MIN_VOCAB <= int(size) <= BPE_MAX_VOCAB:
            raise UsageError(f"--tokenizer bpe:{int(size)}: the vocabulary must hold "
                             f"{BPE_MIN_VOCAB} .. {BPE_MAX_VOCAB:,} tokens (4 special tokens "
                             "and the 256 bytes at least)")
        spec.kind, spec.size = "bpe", int(size)
    elif (Path(text).is_file() and Path(text).suffix == ".json") or Path(text).is_dir():
        spec.kind = "path"
    else:
        raise UsageError(f"--tokenizer {text!r}: expected {TOKENIZER_KINDS} holding a tokenizer")
    return spec


def named_path(text: str, flag: str) -> NamedPath:
    """`NAME=PATH` -> a `NamedPath`; `UsageError` naming `flag` for an empty side or a NAME
    that could not be a metric name (letters, digits and '_', not starting with a digit)."""
    value = NamedPath(text)
    name, sep, path = text.partition("=")
    if not sep:
        value.name, value.path = Path(text).stem, text
        return value
    if not name or not path:
        raise UsageError(f"{flag} {text!r}: expected NAME=PATH")
    if not (name.replace("_", "").isalnum() and name.isascii()) or name[0].isdigit():
        raise UsageError(f"{flag} {text!r}: NAME may use letters, digits and '_' only "
                         "(it is used in metric names such as NAME.accuracy)")
    value.name, value.path = name, path
    return value


def named_path_list(flag: str) -> Callable[[Any], list[NamedPath]]:
    """The `parse` hook of a repeatable `NAME=PATH` option: a `NamedPath` each, names unique."""
    def parse(texts: Any) -> list[NamedPath]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        values = [t if isinstance(t, NamedPath) else named_path(t, flag) for t in texts]
        names = [v.name for v in values]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise UsageError(f"{flag} name {twice!r} is used twice; give each set its own NAME "
                             f"({flag} NAME=PATH)")
        return values
    return parse


def _typed(kind: type, attribute: str, meaning: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A `parse` hook: text -> `kind(text)` carrying `attribute` = `meaning(text)`; a value
    already of `kind` is returned as it is."""
    def parse(text: Any) -> Any:
        if isinstance(text, kind):
            return text
        return _carrying(kind, text, attribute, meaning(text))
    return parse


def _carrying(kind: type, text: Any, attribute: str, meaning: Any) -> Any:
    """`kind(text)` (the text as given) with `attribute` = `meaning`."""
    value = kind(text)
    setattr(value, attribute, meaning)
    return value


def _module_names(text: str) -> str | list[str]:
    if text.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in text.split(",") if name.strip()]


def module_names(text: Any) -> Any:
    """The `parse` hook of `--lora-targets`."""
    return _typed(ModuleNames, "modules", _module_names)(text)


def byte_size(flag: str) -> Callable[[Any], ByteSize]:
    """The `parse` hook of a size option."""
    return _typed(ByteSize, "bytes", lambda text: size_in_bytes(text, flag))


def layer_range(flag: str) -> Callable[[Any], LayerRange]:
    """The `parse` hook of a layer-range option."""
    return _typed(LayerRange, "layers", lambda text: layer_numbers(text, flag))


def pattern(flag: str) -> Callable[[Any], Any]:
    """The `parse` hook of a regular-expression option (one, or a list of them)."""
    one = _typed(Pattern, "regex", lambda text: compile_pattern(flag, text))

    def parse(value: Any) -> Any:
        return [one(v) for v in value] if isinstance(value, (list, tuple)) else one(value)
    return parse


def patterns(flag: str) -> Callable[[Any], list]:
    """The `parse` hook of a repeatable regular-expression option: always a list (one text
    given from Python becomes a list of one)."""
    each = pattern(flag)
    return lambda value: each([value] if isinstance(value, str) else list(value))


def conditions(flag: str, rewrite: Callable[[str], str] = str) -> Callable[[Any], list]:
    """The `parse` hook of a repeatable gate option (`--fail-if`): each text a `Condition`.
    `rewrite` first turns what a command adds to the language into it (`undo report`'s
    `verdict == "recovered"`); the `Condition` stays the text given."""
    def parse(texts: Any) -> list[Condition]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        exprs = parse_gates([rewrite(text) for text in texts], what=flag)
        return [_carrying(Condition, text, "expr", expr) for text, expr in zip(texts, exprs)]
    return parse


def keep_best(text: Any) -> Any:
    """The `parse` hook of `--keep-best` (empty text: off, as before)."""
    return text if not text else _typed(KeepBest, "objective", parse_objective)(text)


def stop_when(text: Any) -> Any:
    """The `parse` hook of `--stop-when` (empty text: off, as before)."""
    return text if not text else _typed(StopWhen, "condition", StopCondition)(text)
