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
import math
import random
import stat
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
                obj = json.loads(line, parse_constant=_refuse_constant)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", path, lineno) from e
            except _NotJson as e:
                raise DataError(str(e), path, lineno) from None
            records.append(Record(obj, str(path), lineno))
    return records


class _NotJson(ValueError):
    """`NaN`, `Infinity` or `-Infinity` in a data file: Python's json reads them, JSON has no
    such text (they would become the strings 'nan', 'inf')."""


def _refuse_constant(token: str) -> Any:
    raise _NotJson(f"{token} is not JSON (JSON has no NaN or infinities); write it as a "
                   "string or a number")


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON Lines.
        try:
            return _read_jsonl(path)
        except DataError:
            raise DataError(f"not valid JSON ({e.msg})", path, e.lineno) from e
    except _NotJson as e:
        raise DataError(str(e), path, _constant_line(text)) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError("expected a JSON list of records (or JSON Lines)", path, 1)
    return [Record(item, str(path), i + 1) for i, item in enumerate(obj)]


def _constant_line(text: str) -> int | None:
    """The line of the first `NaN` / `Infinity` outside a string in JSON `text`."""
    in_string = escaped = False
    line = 1
    for i, ch in enumerate(text):
        if ch == "\n":
            line += 1
        if in_string:
            in_string, escaped = (not (ch == '"' and not escaped)), (ch == "\\" and not escaped)
        elif ch == '"':
            in_string = True
        elif text.startswith(("NaN", "Infinity"), i):
            return line
    return None


def _read_csv(path: Path) -> list[Record]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long texts in a cell
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:  # more cells than the header names
                    raise DataError(f"the row has {len(row) - 1 + len(row[None])} fields, the "
                                    f"header names {len(row) - 1}", path, reader.line_num)
                records.append(Record(dict(row), str(path), reader.line_num))
        except csv.Error as e:
            raise DataError(f"not valid CSV ({e})", path, reader.line_num) from e
    return records


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
    if not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        raise DataError("not a regular file (a FIFO, device or socket never ends, or blocks): "
                        "give a data file", path)
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
    key = "completion" if "completion" in record.data else "answer"
    value = record.data.get(key)
    if value is None:
        raise record.error("'completion' (or 'answer') is missing")
    return _scalar_text(record, key, value)


def _scalar_text(rec: Record, key: str, value: Any) -> str:
    """A field's value as text: strings as they are, finite numbers written out; booleans
    and non-finite numbers (a Parquet NaN) refused rather than read as 'True' or 'nan'."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise rec.error(f"'{key}' is {json.dumps(value)}, not text: write it as a string")
    return str(value)


def parse_weighted_spec(spec: str, option: str = "--data") -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (PATH, WEIGHT). A suffix that is not a number belongs to the path
    (`C:/data.jsonl`, `host:dir`), unless the path without it exists and the whole does not:
    then it is a mistyped weight, refused with a `UsageError` naming `option`."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            if Path(path).exists() and not Path(spec).exists():
                shown = repr(weight) if weight.strip() else "nothing"
                raise UsageError(f"{option} {spec!r}: the weight after ':' must be a number "
                                 f"(got {shown}); write PATH[:WEIGHT], e.g. {path}:0.5") from None
            return spec, 1.0
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option} {spec!r}: the weight must be a positive finite number "
                             f"(got {weight})")
        return path, value
    return spec, 1.0


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
    return _scalar_text(rec, key, value)


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
    choices = [_scalar_text(rec, "choices", c) for c in choices]
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


# ----------------------------------------------------------------------------- results files


# What `report` and `--compare` accept of a results.json: the bootstrap holds a
# [samples, points] array per seed and multiplies every point's items by the resamples, so
# a curve of 200,000 points ran for minutes and took gigabytes. A real attack's curve has a
# few hundred points (--eval-every), a few thousand items each.
MAX_CURVE_POINTS = 5_000
MAX_CURVE_ITEM_VALUES = 5_000_000


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_file(file: Path) -> Any:
    """A JSON document written by undo (results.json, undo.json); `DataError` naming the
    file if it is not readable JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", file) from e
    except RecursionError as e:
        raise DataError("nested too deeply to be undo's JSON", file) from e
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", file) from e


def check_attack_results(results: Any, file: Path) -> dict[str, Any]:
    """`results` if it has the shape of `undo relearn-attack`'s results.json (the parts
    `report` and `--compare` read: docs/relearn-results.md); `DataError` naming the file and
    the first part that is wrong."""
    def bad(what: str) -> DataError:
        return DataError(f"{what} (not written by `undo relearn-attack`?)", file)

    if not isinstance(results, dict):
        raise bad(f"a JSON {type(results).__name__}, expected an object")
    for key in ("forget_metric", "worst_case", "summary"):
        if key not in results:
            raise bad(f"missing '{key}'")
    metric = results["forget_metric"]
    if not isinstance(metric, str) or "." not in metric:
        raise bad("'forget_metric' must be a name such as forget.accuracy")
    curve = results["worst_case"]
    if not isinstance(curve, list) or not all(
            isinstance(p, dict) and _is_number(p.get("step"))
            and (p.get("value") is None or _is_number(p.get("value"))) for p in curve):
        raise bad("'worst_case' must be a list of {\"step\": N, \"value\": X}")
    if not curve:
        raise bad("'worst_case' is empty")
    if len(curve) > MAX_CURVE_POINTS:
        raise DataError(f"'worst_case' has {len(curve):,} points; undo reads at most "
                        f"{MAX_CURVE_POINTS:,} (evaluate the attack less often: --eval-every)",
                        file)
    item_values = sum(len(p["items"].get("num") or ()) if isinstance(p.get("items"), dict)
                      else 0 for p in curve)
    if item_values > MAX_CURVE_ITEM_VALUES:
        raise DataError(f"'worst_case' keeps {item_values:,} per-item values; undo reads at "
                        f"most {MAX_CURVE_ITEM_VALUES:,} (fewer points or --eval-limit)", file)
    for point in curve:
        if any(point.get(k) is not None and not _is_number(point[k]) for k in ("lower", "upper")):
            raise bad("a worst-case point's 'lower'/'upper' must be numbers")
        items = point.get("items")
        if items is not None and not (
                isinstance(items, dict) and isinstance(items.get("num"), list)
                and isinstance(items.get("den"), list)
                and len(items["num"]) == len(items["den"]) > 0
                and all(_is_number(v) for v in items["num"] + items["den"])):
            raise bad("a worst-case point's 'items' must hold lists 'num' and 'den' of "
                      "numbers, of one length")
    sizes = {len(p["items"]["num"]) for p in curve if p.get("items") is not None}
    if len(sizes) > 1:
        raise bad(f"the worst-case points keep 'items' of different lengths {sorted(sizes)} "
                  "(every point scores the same items)")
    summary = results["summary"]
    if not isinstance(summary, dict) or any(
            summary.get(k) is not None and not _is_number(summary.get(k))
            for k in ("final", "auc", "initial")):
        raise bad("'summary' must be an object of numbers (final, auc)")
    initial = results.get("initial", {})
    if not isinstance(initial, dict) or any(
            v is not None and not _is_number(v) for v in initial.values()):
        raise bad("'initial' must be an object of metric values")
    for key in ("direction", "fingerprint", "checkpoint"):
        if results.get(key) is not None and not isinstance(results[key], str):
            raise bad(f"'{key}' must be a string")
    return results


def check_manifest(manifest: Any, file: Path) -> dict[str, Any]:
    """`manifest` if it has the shape of an `undo.json` where `report` reads it (parents with
    their own manifests, compute with FLOPs), walked without recursion; `DataError` naming
    the file otherwise."""
    stack = [manifest]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            raise DataError(f"a manifest must be a JSON object, found a {type(node).__name__}",
                            file)
        compute = node.get("compute")
        if compute is not None and (not isinstance(compute, dict) or (
                compute.get("flops") is not None and not _is_number(compute.get("flops")))):
            raise DataError("'compute' must be an object with a number 'flops'", file)
        parents = node.get("parents", [])
        if not isinstance(parents, list) or not all(isinstance(p, dict) for p in parents):
            raise DataError("'parents' must be a list of objects", file)
        for parent in parents:
            if parent.get("fingerprint") is not None and not isinstance(
                    parent["fingerprint"], str):
                raise DataError("a parent's 'fingerprint' must be a string", file)
            if parent.get("manifest") is not None:
                stack.append(parent["manifest"])
    return manifest
