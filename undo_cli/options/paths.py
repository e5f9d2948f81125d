"""The paths a command reads, declared by its options and checked in one place.

Every path-typed option (a `Path` field or parameter, or text declared with `reads=`: `NAME=PATH`
and `PATH[:WEIGHT]` specs, an `sqlite:///FILE` storage) is one of the command's reads. The
command-line generator (`undo_cli.cli.options.with_options`) collects them with
`declared_reads` for the duration of the command, and `check_output_path` refuses an OUT that
contains any of them before any work: `--overwrite` never deletes an input (a `--base-model`,
a `probe --data` file, a `--search-storage` database) that lies inside OUT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

Reads = list[tuple[str, Path]]
_declared: ContextVar[tuple[tuple[str, Path], ...]] = ContextVar("undo_declared_reads",
                                                                 default=())


def named_paths(value: Any) -> list[str]:
    """The PATH of `NAME=PATH` values (a value without `=` is taken whole)."""
    return [str(v).partition("=")[2] or str(v) for v in _values(value)]


def weighted_paths(value: Any) -> list[str]:
    """The PATH of `PATH[:WEIGHT]` values: the whole text and the text before the last `:`
    (whichever exists is the file)."""
    return [p for v in _values(value) for p in (str(v), str(v).rpartition(":")[0]) if p]


def sqlite_path(value: Any) -> list[str]:
    """The database file of an `sqlite:///FILE` storage URL (none for other schemes)."""
    return [str(v)[len("sqlite:///"):] for v in _values(value)
            if str(v).startswith("sqlite:///")]


def plain_paths(value: Any) -> list[str]:
    """A path or list of paths as given."""
    return [str(v) for v in _values(value)]


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def existing(flag: str, value: Any, extract: Callable[[Any], list[str]]) -> Reads:
    """`(flag, path)` for each path `extract` finds in `value` that exists (only an existing
    file or directory can be deleted by an `--overwrite`)."""
    found: Reads = []
    for text in extract(value):
        try:
            if text and Path(text).exists():
                found.append((flag, Path(text)))
        except (OSError, ValueError):  # a name too long or with a NUL: not a file
            continue
    return found


@contextmanager
def declared_reads(reads: Iterable[tuple[str, Path]]) -> Iterator[None]:
    """Within the block, `current_reads()` returns `reads` (set by the generated command)."""
    token = _declared.set(tuple(reads))
    try:
        yield
    finally:
        _declared.reset(token)


def current_reads() -> Reads:
    """The reads the running command declared (none outside a generated command)."""
    return list(_declared.get())
