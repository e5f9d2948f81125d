"""lm-eval's errors about a task's YAML as one line naming the task file, the line and the
field (`task_error`), instead of a bare `TypeError: TaskConfig.__init__() got an unexpected
keyword argument 'metric_lst'` or `KeyError: 'metric'`.

The task file is the YAML given (`--lm-eval-tasks my_task.yaml`), the one a YAML error
names, or the one under `--lm-eval-include-path` whose `task:` is the task's name. The field
comes from the error: an unexpected keyword (a field lm-eval does not know: the closest known
ones are suggested), a missing key, or a YAML syntax error's own line; failing that, a
field of the file the message quotes.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from undo_cli.errors import DataError

_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")
_QUOTED = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)'")
_YAML_FILE = re.compile(r'in "([^"]+\.ya?ml)", line (\d+)')
# lm-eval's TaskConfig fields (0.4), used when lm_eval itself cannot be asked.
KNOWN_FIELDS = (
    "task", "task_alias", "tag", "group", "group_alias", "dataset_path", "dataset_name",
    "dataset_kwargs", "training_split", "validation_split", "test_split", "fewshot_split",
    "process_docs", "doc_to_text", "doc_to_target", "doc_to_image", "doc_to_audio",
    "unsafe_code", "doc_to_choice", "process_results", "use_prompt", "description",
    "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list",
    "output_type", "generation_kwargs", "repeats", "filter_list", "should_decontaminate",
    "doc_to_decontamination_query", "gen_prefix", "multiple_input", "metadata", "include",
)


def known_fields() -> tuple[str, ...]:
    """The fields of lm-eval's `TaskConfig` (from lm_eval when installed)."""
    try:
        from dataclasses import fields

        from lm_eval.api.task import TaskConfig

        return tuple(f.name for f in fields(TaskConfig))
    except Exception:  # noqa: BLE001 - not installed, or another version's layout
        return KNOWN_FIELDS


def task_files(specs: Sequence[str], include_path: Sequence[str | Path] = ()) -> list[Path]:
    """The YAML files that define `specs`: the files given, and under the include paths the
    ones whose `task:` (or `group:`) is one of the names."""
    files = [Path(s) for s in specs if s.endswith((".yaml", ".yml")) and Path(s).is_file()]
    names = [s for s in specs if not s.endswith((".yaml", ".yml"))]
    if names:
        pattern = re.compile(r"^(?:task|group):\s*['\"]?(" + "|".join(map(re.escape, names))
                             + r")['\"]?\s*(?:#.*)?$", re.MULTILINE)
        for root in include_path:
            for path in sorted(Path(root).rglob("*.y*ml")):
                try:
                    if pattern.search(path.read_text(errors="replace")):
                        files.append(path)
                except OSError:
                    continue
    return files


def field_line(path: Path, name: str) -> int | None:
    """The 1-based line where `path` sets field `name` (`name:` at the start of a line, or
    as a list item's key), or None."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    key = re.compile(r"^\s*(?:-\s+)?['\"]?" + re.escape(name) + r"['\"]?\s*:")
    return next((i for i, line in enumerate(lines, 1) if key.match(line)), None)


def task_error(error: BaseException, specs: Sequence[str],
               include_path: Sequence[str | Path] = ()) -> DataError | None:
    """`error`, raised by lm-eval while it read or built tasks `specs`, as a `DataError`
    naming the task file, line and field; None when it is not about a task's YAML."""
    text = " ".join(str(error).split())
    mark = getattr(error, "problem_mark", None)
    if mark is not None:  # a YAML syntax error: it knows its file and line
        name = getattr(mark, "name", None)
        path = Path(name) if name and not name.startswith("<") else None
        files = [path] if path else task_files(specs, include_path)
        problem = getattr(error, "problem", None) or text
        return DataError(f"lm-eval task file is not valid YAML: {problem}",
                         files[0] if files else ", ".join(specs), mark.line + 1)
    found = _YAML_FILE.search(text)
    if found:
        return DataError(f"lm-eval cannot read this task: {text[:200]}", found.group(1),
                         int(found.group(2)))
    files = task_files(specs, include_path)
    where = files[0] if len(files) == 1 else None
    known = known_fields()
    unexpected = _UNEXPECTED.search(text)
    if unexpected and isinstance(error, TypeError):
        field = unexpected.group(1)
        close = difflib.get_close_matches(field, known, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else \
            " (lm-eval's task fields: dataset_path, doc_to_text, doc_to_target, ...)"
        return _at(where, field, f"field {field!r} is not a field lm-eval tasks have{hint}",
                   specs)
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        field = error.args[0]
        return _at(where, field, f"lm-eval needs the field {field!r} here, and the task does "
                   "not set it (or misspells it)", specs)
    if isinstance(error, (TypeError, AttributeError, ValueError)) and files:
        quoted = [q for q in _QUOTED.findall(text) if q in known]
        field = quoted[0] if quoted else None
        if field is None and where is not None:
            field = next((f for f in known if f in text and field_line(where, f)), None)
        what = f"field {field!r} has a value lm-eval cannot use" if field else \
            "a field has a value of the wrong type"
        return _at(where, field, f"{what} ({type(error).__name__}: {text[:160]})", specs)
    return None


def _at(path: Path | None, field: str | None, message: str, specs: Sequence[str]) -> DataError:
    if path is None:
        return DataError(f"lm-eval task {', '.join(specs)}: {message}")
    return DataError(f"lm-eval task: {message}", path,
                     field_line(path, field) if field else None)
