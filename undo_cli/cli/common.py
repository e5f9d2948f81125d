"""Small helpers shared by the command modules: output streams, JSON, option parsing."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Human-readable output goes to stderr so that stdout stays clean for `--json`.
err_console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A status line for people, on stderr."""
    err_console.print(message, markup=False)


def emit_json(payload: Any) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()
