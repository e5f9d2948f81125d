"""The `undo` command line: option parsing only; all work is done by library functions.

`app.py` holds the application (`app`, `main`, one-line errors); each subcommand lives in its
own module of this package and registers itself on `app` when imported here, so that no
command module imports this package (no import loop).
"""

from __future__ import annotations

import importlib
import sys

from undo_cli.cli.app import (
    GATES_AFTER_WRITING,
    SCALES_OUT,
    UndoGroup,
    app,
    debug_enabled,
    main,
    refuse_launch,
)

# Each module adds its command(s) to `app` on import; `undo --help` lists them in this order.
COMMAND_MODULES = ("init_cmd", "data_cmd", "train_cmd", "unlearn_cmd", "perturb_cmd",
                   "distill_cmd", "relearn_cmd", "plan_cmd", "eval_cmd", "probe_cmd",
                   "report_cmd")
for _module in COMMAND_MODULES:
    importlib.import_module(f"undo_cli.cli.{_module}")

__all__ = ["COMMAND_MODULES", "GATES_AFTER_WRITING", "SCALES_OUT", "UndoGroup", "app",
           "debug_enabled", "main", "refuse_launch"]

if __name__ == "__main__":
    main()
    sys.exit(0)
