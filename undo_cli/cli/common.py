"""Small helpers shared by the command modules: output set-up and lazily built help."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from undo_cli.console import err_console, info, log_to_stderr
from undo_cli.jsontext import to_json

__all__ = ["emit_json", "err_console", "info", "is_main_rank", "lazy_help", "show_output"]


def emit_json(payload: Any) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(to_json(payload, indent=2) + "\n")
    sys.stdout.flush()


def is_main_rank() -> bool:
    """Whether this process reports (the first of a multi-process launch; always alone)."""
    return os.environ.get("RANK", "0") == "0"


def show_output(quiet: bool) -> bool:
    """Set up the library's notes on stderr for one command; whether to draw progress.

    Notes (logging INFO) show unless `quiet`; warnings always; under a multi-process launch
    only the first process says anything but errors.
    """
    main = is_main_rank()
    level = logging.INFO if (main and not quiet) else logging.WARNING if main else logging.ERROR
    log_to_stderr(level)
    return main and not quiet


# ------------------------------------------------------------------------------- lazy help
#
# `undo --help` and every command but the one asked for must not import torch, yet some help
# texts are built from registries in torch-importing modules (e.g. the unlearning methods).
# Such a command passes a short help for the command list and builds its full help only when
# it is shown:
#
#     @app.command("unlearn", cls=lazy_help(_help, options={"method": _method_help}),
#                  short_help=_SUMMARY)


def lazy_help(text: Callable[[], str], *,
              options: dict[str, Callable[[], str]] | None = None) -> type:
    """A typer command class whose help is `text()` and whose options named in `options`
    (by parameter name) get the help `options[name]()`, called only when help is formatted.

    Pass it as `cls=` with a `short_help=` (the command list shows that without building the
    full help).
    """
    from typer.core import TyperCommand

    options = dict(options or {})

    class LazyHelpCommand(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            unknown = set(options) - {param.name for param in self.params}
            if unknown:
                raise TypeError(f"{self.name}: lazy help for unknown options {sorted(unknown)}")
            self._help_built = False

        def format_help(self, ctx: Any, formatter: Any) -> None:
            if not self._help_built:
                self.help = inspect.cleandoc(text())
                for param in self.params:
                    if param.name in options:
                        param.help = options[param.name]()
                self._help_built = True
            return super().format_help(ctx, formatter)

    return LazyHelpCommand
