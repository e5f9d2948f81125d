"""Output for people and pipelines: the ground floor (imports nothing of undo's).

- stdout carries only `--json` documents (`undo_cli.cli.common.emit_json`); everything for
  people goes to stderr.
- The library reports through the standard `logging` module (logger `undo_cli` and its
  children) and through callbacks; `log_to_stderr` installs the handler that prints those
  records on stderr, one line each, as the command line does.
- `ProgressDisplay` is the one progress bar of every command: a rich bar on a terminal,
  plain status lines otherwise (logs of CI and pipelines stay readable).
"""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console

# Human-readable output goes to stderr so that stdout stays clean for `--json`.
err_console = Console(stderr=True, highlight=False)
LOGGER = "undo_cli"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": " "}


def one_line(text: str) -> str:
    """`text` as one line: line breaks in it (a path holding a newline, a library's report)
    shown as `\\n`, other control characters as `\\xNN`, so that a message can neither span
    lines nor move the terminal's cursor."""
    text = text.strip()
    if text.isprintable():
        return text
    return "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\x{ord(c):02x}")
                   if not c.isprintable() else c for c in text)


def info(message: str) -> None:
    """A status line for people, on stderr (always one line: `one_line`)."""
    err_console.print(one_line(message), markup=False, highlight=False, soft_wrap=True)


class _StderrHandler(logging.Handler):
    """Each record as one line on stderr (the message only: notes say what they are)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            info(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break a command
            self.handleError(record)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Print the library's log records of `level` and above on stderr (replacing any handler
    installed before, so a second command in the same process does not print twice)."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _StderrHandler):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


class ProgressDisplay:
    """One progress bar (a rich bar on a terminal) with a status text and messages above it;
    off a terminal, status lines instead. `enabled=False` shows nothing.

    `start(total, description)`, `update(completed, status=None, description=None)`,
    `message(text)`, `close()`; `total=None` is an open-ended count.
    """

    def __init__(self, enabled: bool = True, *, transient: bool = False, bytes_: bool = False):
        self.enabled = enabled
        self.transient = transient
        self.bytes = bytes_
        self.bar = None
        self.task = None
        self.last_status = ""

    @property
    def live(self) -> bool:
        return self.bar is not None

    def start(self, total: float | None, description: str) -> None:
        if not self.enabled or not err_console.is_terminal or self.bar is not None:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        count = ([DownloadColumn(), TransferSpeedColumn()] if self.bytes
                 else [MofNCompleteColumn()])
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                            *count, TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=err_console,
                            transient=self.transient)
        self.task = self.bar.add_task(description, total=total, status="")
        self.bar.start()

    def update(self, completed: float | None = None, *, status: str | None = None,
               description: str | None = None, total: float | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if status is not None and status != self.last_status:
                info(status)  # off a terminal: the status line itself
            if status is not None:
                self.last_status = status
            return
        changes: dict[str, Any] = {}
        if completed is not None:
            changes["completed"] = completed
        if status is not None:
            changes["status"] = status
        if description is not None:
            changes["description"] = description
        if total is not None:
            changes["total"] = total
        self.bar.update(self.task, **changes)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
