"""Exceptions that the CLI turns into a one-line message and a meaningful exit code.

Exit codes used by every `undo` command:

- 0: success
- 1: runtime failure (a file that cannot be read, a diverging run, a failed load, ...)
- 2: usage error (a bad argument value, a missing input path, a refused output path, ...)
- 3: a `--fail-if` gate failed (the command worked, the model did not pass)
- 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class UndoError(Exception):
    """A failure the user can act on; the message says what to fix."""

    exit_code = EXIT_RUNTIME


class UsageError(UndoError):
    """A bad argument or input path: nothing was done."""

    exit_code = EXIT_USAGE


class DataError(UsageError):
    """A data file that cannot be used (exit 2); the message names the file and line."""

    def __init__(self, message: str, path: object = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class GateFailed(UndoError):
    """A `--fail-if` gate held: the run worked but the model failed the check."""

    exit_code = EXIT_GATE
