"""Reading example files into records, with the file and line of each for error messages.

Formats: JSON Lines (`.jsonl`), JSON (`.json`: a list of objects), CSV (`.csv`), Parquet
(`.parquet`, needs pyarrow) and directories written by `datasets.save_to_disk` (needs
`datasets`). Record shapes, decided by their keys:

- `text`: `{"text": ...}`, language-model data.
- `completion`: `{"prompt": ..., "completion": ...}` (or `answer` for `completion`).
- `choice`: `{"question": ..., "choices": [...], "answer": index or letter}`.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from undo_cli.errors import DataError, UsageError

SHAPES = ("text", "completion", "choice")


@dataclass(frozen=True)
class Record:
    """One example and where it came from."""

    data: dict[str, Any]
    source: str
    line: int

    def error(self, message: str) -> DataError:
        """A `DataError` pointing at this record's file and line."""
        return DataError(message, self.source, self.line)


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", path, lineno) from e
            records.append(Record(obj, str(path), lineno))
    return records


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON Lines.
        try:
            return _read_jsonl(path)
        except DataError:
            raise DataError(f"not valid JSON ({e.msg})", path, e.lineno) from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError("expected a JSON list of records (or JSON Lines)", path, 1)
    return [Record(item, str(path), i + 1) for i, item in enumerate(obj)]


def _read_csv(path: Path) -> list[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return [Record(dict(row), str(path), i + 2) for i, row in enumerate(reader)]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError(f"{path}: reading Parquet needs pyarrow "
                         "(pip install 'undo-cli[formats]')") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"cannot read Parquet file ({e})", path) from e
    return [Record(row, str(path), i + 1) for i, row in enumerate(rows)]


def _read_saved_dataset(path: Path) -> list[Record]:
    try:
        import datasets
    except ImportError as e:
        raise UsageError(f"{path}: reading a saved `datasets` directory needs the datasets "
                         "package (pip install 'undo-cli[formats]')") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read the saved dataset ({e})", path) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"a DatasetDict with splits {list(ds)}: save one split", path)
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [Record(row, str(path), i + 1) for i, row in enumerate(ds)]


def read_records(path: str | Path) -> list[Record]:
    """All records of a data file (or saved dataset directory); raises `DataError`/`UsageError`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            records = _read_saved_dataset(path)
        else:
            raise DataError("a directory that is not a saved `datasets` dataset", path)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
                   ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"unknown data format '{suffix or path.name}'; use .jsonl, .json, "
                            ".csv, .parquet or a saved datasets directory", path)
        try:
            records = readers[suffix](path)
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text ({e.reason})", path) from e
        except OSError as e:
            raise DataError(f"cannot read ({e.strerror or e})", path) from e
    if not records:
        raise DataError("the data set is empty", path)
    for rec in records:
        if not isinstance(rec.data, dict):
            raise rec.error("a record must be an object with named fields")
    return records


def record_shape(record: Record) -> str:
    """`text`, `completion` or `choice`, from the record's keys; `DataError` if none fits."""
    keys = record.data
    if "choices" in keys and "question" in keys and "answer" in keys:
        return "choice"
    if "prompt" in keys and ("completion" in keys or "answer" in keys):
        return "completion"
    if "text" in keys:
        return "text"
    raise record.error(
        f"record has fields {sorted(keys)}; expected 'text', 'prompt' + 'completion'/'answer', "
        "or 'question' + 'choices' + 'answer'"
    )


def file_shape(records: list[Record]) -> str:
    """The one shape shared by every record of a file; `DataError` at the first that differs."""
    shape = record_shape(records[0])
    for rec in records[1:]:
        other = record_shape(rec)
        if other != shape:
            raise rec.error(f"record shape '{other}' differs from the file's first record "
                            f"('{shape}'); use one shape per file")
    return shape


def completion_of(record: Record) -> str:
    """The completion text of a prompt/completion record (`answer` is accepted too)."""
    value = record.data.get("completion", record.data.get("answer"))
    if value is None:
        raise record.error("'completion' (or 'answer') is missing")
    return str(value)


def parse_weighted_spec(spec: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (PATH, WEIGHT); a suffix that is not a number belongs to the path."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not value > 0:
            raise UsageError(f"--data {spec!r}: the weight must be positive")
        return path, value
    return spec, 1.0


def parse_named_spec(spec: str, option: str = "--data") -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH is named after its file stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).stem, spec
    if not name or not path:
        raise UsageError(f"{option} {spec!r}: expected NAME=PATH")
    if not (name.replace("_", "").isalnum() and name.isascii()) or name[0].isdigit():
        raise UsageError(f"{option} {spec!r}: NAME may use letters, digits and '_' only "
                         "(it is used in metric names such as NAME.accuracy)")
    return name, path


def parse_named_specs(specs: list[str], option: str = "--eval") -> list[tuple[str, str]]:
    """`NAME=PATH` values of a repeatable option as `(name, path)` pairs, names unique."""
    pairs = [parse_named_spec(spec, option) for spec in specs]
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{option} name {twice!r} is used twice; give each set its own NAME "
                         f"({option} NAME=PATH)")
    return pairs


# ----------------------------------------------------------------------------- evaluation data


def _arithmetic_factory(key: str) -> Callable[[], list[Record]]:
    def factory() -> list[Record]:
        from undo_cli.synthetic import arithmetic_records

        rows = arithmetic_records().records[key]
        return [Record(row, f"arithmetic:{key}", i + 1) for i, row in enumerate(rows)]

    return factory


def _builtin(name: str) -> Callable[[], list[Record]] | None:
    """The factory of a built-in set: `arithmetic:FILE_KEY` (the synthetic arithmetic task
    with the generator's default options)."""
    task, _, key = name.partition(":")
    if task == "arithmetic" and key:
        try:
            from undo_cli.synthetic import FILES
        except ImportError:
            return None
        if key in FILES:
            return _arithmetic_factory(key)
    return None


@dataclass
class EvalData:
    """A validated data file: its records reduced to what the metrics need (no tokens yet).

    `items` per shape: `text` -> the text; `completion` -> (prompt, answer);
    `choice` -> (question, choices, index of the correct choice).
    """

    name: str
    shape: str
    source: str
    records: list[Record]
    items: list[Any]

    def __len__(self) -> int:
        return len(self.items)


def text_field(rec: Record, key: str) -> str:
    """The string in field `key` of `rec`; `DataError` (file and line) if it is missing, null
    or not a scalar."""
    value = rec.data.get(key)
    if value is None:
        raise rec.error(f"'{key}' is missing or null")
    if isinstance(value, (dict, list)):
        raise rec.error(f"'{key}' must be a string, not {type(value).__name__}")
    return str(value)


def _choice_answer(rec: Record, value: Any, n_choices: int) -> int:
    if isinstance(value, bool) or value is None:
        raise rec.error(f"'answer' must be a choice index or a letter, not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    index: int | None = None
    if isinstance(value, int):
        index = value
    elif isinstance(value, str):
        s = value.strip()
        if s.isdigit():
            index = int(s)
        elif len(s) == 1 and "A" <= s.upper() <= "Z":
            index = ord(s.upper()) - ord("A")
    if index is None:
        raise rec.error(f"'answer' must be a choice index (0-based) or a letter A-Z, "
                        f"not {value!r}")
    if not 0 <= index < n_choices:
        raise rec.error(f"'answer' {value!r} is out of range for {n_choices} choices")
    return index


def _choice_item(rec: Record) -> tuple[str, list[str], int]:
    question = text_field(rec, "question")
    choices = rec.data.get("choices")
    if isinstance(choices, str):  # CSV cells hold the list as JSON text
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError as e:
            raise rec.error("'choices' must be a list (in CSV: a JSON list)") from e
    if hasattr(choices, "tolist"):  # numpy arrays from Parquet
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)) or not choices:
        raise rec.error("'choices' must be a non-empty list")
    if any(c is None or isinstance(c, (dict, list)) for c in choices):
        raise rec.error("every choice must be a string")
    choices = [str(c) for c in choices]
    if any(not c for c in choices):
        raise rec.error("every choice must be a non-empty string")
    if len(choices) > 26:
        raise rec.error(f"{len(choices)} choices; at most 26 (A-Z) are supported")
    return question, choices, _choice_answer(rec, rec.data.get("answer"), len(choices))


def _check_choice_fields(records: list[Record]) -> None:
    """A clearer error than "unknown shape" for multiple-choice records missing a field."""
    for rec in records:
        keys = rec.data
        if "question" in keys and not ("prompt" in keys or "text" in keys):
            for need in ("choices", "answer"):
                if need not in keys:
                    raise rec.error(f"'{need}' is missing (a multiple-choice record needs "
                                    "'question', 'choices' and 'answer')")


def read_eval_data(name: str, path: str | Path, *, limit: int | None = None,
                   seed: int = 0) -> EvalData:
    """Read and validate a data file (or a built-in set's name) for evaluation.

    `limit`: keep a seeded random sample of that many records (in file order). Raises
    `DataError` naming the file and line for an unknown record shape, a missing or bad
    field, an answer index out of range, or an empty file.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    builtin = None if Path(path).exists() else _builtin(str(path))
    if builtin is None and not Path(path).exists() and str(path).startswith("arithmetic:"):
        from undo_cli.synthetic import FILES

        raise UsageError(f"unknown built-in data set {str(path)!r}; the arithmetic task has "
                         + ", ".join(f"arithmetic:{key}" for key in FILES))
    if builtin is not None:
        records = builtin()
        if not records:
            raise DataError("the data set is empty", path)
    else:
        records = read_records(path)
    if limit is not None and limit < len(records):
        picked = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in picked]
    _check_choice_fields(records)
    shape = file_shape(records)
    items: list[Any]
    if shape == "text":
        items = [text_field(rec, "text") for rec in records]
    elif shape == "completion":
        items = []
        for rec in records:
            if isinstance(rec.data.get("completion", rec.data.get("answer")), (dict, list)):
                raise rec.error("'completion' (or 'answer') must be a string")
            items.append((text_field(rec, "prompt"), completion_of(rec)))
    else:
        items = [_choice_item(rec) for rec in records]
    return EvalData(name=name, shape=shape, source=str(path), records=records, items=items)
