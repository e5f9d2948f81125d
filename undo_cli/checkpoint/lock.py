"""One run per output: an exclusive lock on OUT for the whole run, naming its holder.

`undo CMD ... OUT` takes `fcntl.flock` on a lock file beside OUT (`.OUT.undo-lock`, holding
the owner's pid, command and start time) as soon as its output path has been checked, and
keeps it until the command ends (`command_scope`, entered by the command line around every
command); `atomic_output` holds it too while it writes. A second run to the same OUT fails
at once (exit 2) saying who holds it, instead of silently replacing the first run's output.
The lock is re-entrant within a process and dies with its process (a `kill -9` leaves a
lock file that nobody holds: the next run takes it).

Under a multi-process launch only the first process (RANK 0), which writes, takes it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

from undo_cli.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_MARK = ".undo-lock"

class _Scope:
    """The locks one command holds until it ends."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.held: set[Path] = set()


_held: dict[Path, list] = {}  # OUT (absolute) -> [fd, count, lock file, created parents]
_scope: ContextVar[_Scope | None] = ContextVar("undo_command_scope", default=None)
_committed: list[Path] = []  # outputs renamed into place during the current command


def lock_file(out: Path) -> Path:
    """The lock file of output `out`: `.NAME.undo-lock` beside it."""
    return out.parent / f".{out.name}{LOCK_MARK}"


def _is_writer() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _holder_text() -> str:
    command = " ".join(["undo", *[a for a in sys.argv[1:] if not a.startswith("-")][:1]])
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {started}"


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _acquire(out: Path) -> None:
    key = out.absolute()
    if key in _held:
        _held[key][1] += 1
        return
    created = [p for p in reversed(key.parents) if not p.exists()]
    path = lock_file(key)
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        remove_empty_dirs(created)
        raise UsageError(f"cannot write beside the output {out}: {e.strerror or e} "
                         f"({path.parent})") from e
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            remove_empty_dirs(created)
            raise UsageError(f"output {out} is being written by another undo run ({holder}); "
                             "wait for it to finish or choose another OUT") from None
        try:  # the previous holder may have removed the file we locked: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    with suppress(OSError):  # who holds it, for the message of a second run (best effort)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
    _held[key] = [fd, 1, path, created]


def _release(out: Path) -> None:
    key = out.absolute()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd, _, path, created = entry
    with suppress(OSError):
        os.unlink(path)  # while still locked: a waiting run then locks a fresh file
    os.close(fd)
    remove_empty_dirs(created)


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove the directories `dirs` created (innermost last), while they are empty."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold OUT's lock during the block (`UsageError` naming the holder if another run has
    it). Re-entrant; a no-op where there is no `fcntl`, and on processes other than the
    first of a launch."""
    if fcntl is None or not _is_writer():
        yield
        return
    out = Path(out)
    _acquire(out)
    try:
        yield
    finally:
        _release(out)


def hold_output(out: str | Path) -> None:
    """Take OUT's lock now and keep it until the current `command_scope` ends (outside one,
    do nothing: `atomic_output` locks while it writes)."""
    scope = _scope.get()
    if scope is None or fcntl is None or not _is_writer():
        return
    key = Path(out).absolute()
    if key not in scope.held:
        scope.stack.enter_context(output_lock(key))
        scope.held.add(key)


@contextmanager
def command_scope() -> Iterator[None]:
    """One command: the output locks taken by `hold_output` are released when it ends, and
    `committed_outputs()` lists the outputs it renamed into place."""
    _committed.clear()
    with ExitStack() as stack:
        token = _scope.set(_Scope(stack))
        try:
            yield
        finally:
            _scope.reset(token)


def mark_committed(out: Path) -> None:
    """Record that `out` is complete and in place (see `committed_outputs`)."""
    _committed.append(out)


def committed_outputs() -> list[Path]:
    """The outputs the current command has already renamed into place (complete): an
    interruption after that point loses nothing."""
    return list(_committed)
