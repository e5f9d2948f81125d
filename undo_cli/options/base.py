"""Declaring an option once: `option(...)` (a dataclass field with its help, flag, panel and
accepted values), `flag_of`, and `check` (parse-time validation naming the flag)."""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any

from undo_cli.errors import UsageError

TRAINING = "Training"
DATA = "Data"
EVALUATION = "Evaluation"
IN_OUT = "Input and output"
METHOD = "Method"
DISTILLATION = "Distillation"
ATTACK = "Attack"
MEASUREMENT = "Measurement"
NOISE = "Noise"


def option(default: Any = None, help: str = "", *, flag: str | None = None,  # noqa: A002
           short: str | None = None, metavar: str | None = None, panel: str | None = None,
           cli: bool = True, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, choices: tuple[str, ...] | None = None,
           factory: Any = None, parse: Any = None) -> Any:
    """A dataclass field with what the command line and `check` need.

    `flag` defaults to `--field-name`; `minimum`/`maximum` bound a number (inclusive),
    `above` from below (exclusive); every float must be finite; `choices` lists the accepted
    strings. `cli=False` keeps the field out of the command line (set by the library);
    `parse` turns the text given on the command line into the field's value.
    """
    metadata = {"help": help, "flag": flag, "short": short, "metavar": metavar,
                "panel": panel, "cli": cli, "minimum": minimum, "above": above,
                "maximum": maximum, "choices": choices, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(f) -> str:
    """The command-line flag of dataclass field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check(group: Any) -> None:
    """`UsageError` naming the flag for a value outside what its field accepts."""
    for f in fields(group):
        value = getattr(group, f.name)
        meta = f.metadata
        if value is None or isinstance(value, bool) or "help" not in meta:
            continue
        name = flag_of(f)
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number (got {v})")
            if isinstance(v, int) and abs(v) > 2**63 - 1:
                raise UsageError(f"{name} is out of range (got {v})")
            if meta["minimum"] is not None and v < meta["minimum"]:
                raise UsageError(f"{name} must be at least {meta['minimum']:g} (got {v:g})")
            if meta["above"] is not None and not v > meta["above"]:
                raise UsageError(f"{name} must be greater than {meta['above']:g} (got {v:g})")
            if meta["maximum"] is not None and v > meta["maximum"]:
                raise UsageError(f"{name} must be at most {meta['maximum']:g} (got {v:g})")
        if meta["choices"] is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v not in meta["choices"]:
                    raise UsageError(f"{name} must be one of {', '.join(meta['choices'])} "
                                     f"(got {v!r})")
