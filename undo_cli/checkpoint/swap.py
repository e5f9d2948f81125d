"""Replacing a directory in one step, and keeping signals out of that step.

`exchange(a, b)` swaps two paths atomically with Linux's `renameat2(RENAME_EXCHANGE)` (called
through ctypes): `--overwrite` puts the new output in place and the old one where the new one
was in a single system call, so no crash leaves OUT missing. Where the kernel, the C library
or the file system lacks it, it returns False and the caller falls back to two renames (with
recovery of the old output at the next run, `undo_cli.checkpoint.output`).

`signals_deferred()` holds SIGINT and SIGTERM back for the few system calls that make an
output complete, then delivers them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1),
                getattr(errno, "EOPNOTSUPP", -1)}
_renameat2 = None


def _function():
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "renameat2", None)
        except OSError:  # pragma: no cover
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn or False
    return _renameat2 or None


def exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` (both must exist) in one atomic step; False if the platform
    cannot (nothing was changed), `OSError` for a real failure."""
    fn = _function()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving during the block are delivered after it (through the
    handlers that were installed before), so the block is never cut in the middle. Only the
    main thread can do this; elsewhere the block simply runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if any(handler is None for handler in previous.values()):  # set outside Python
        yield
        return
    for signum in previous:
        signal.signal(signum, lambda s, _frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
