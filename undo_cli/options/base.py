"""Declaring an option once: `option(...)` (a dataclass field with its help, flag, panel and
accepted values), `flag_of`, and `check` (parse-time validation naming the flag)."""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.options.paths import named_paths
from undo_cli.options.text import compile_pattern, named_path_list, size_in_bytes  # noqa: F401

parse_size = size_in_bytes  # the name the library has used

TRAINING = "Training"
DATA = "Data"
EVALUATION = "Evaluation"
IN_OUT = "Input and output"
METHOD = "Method"
DISTILLATION = "Distillation"
ATTACK = "Attack"
MEASUREMENT = "Measurement"
NOISE = "Noise"
SELECTION = "What trains"
TRACKING = "Experiment tracking"


def option(default: Any = None, help: str = "", *, flag: str | None = None,  # noqa: A002
           short: str | None = None, metavar: str | None = None, panel: str | None = None,
           cli: bool = True, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, choices: tuple[str, ...] | None = None,
           factory: Any = None, parse: Any = None, repeatable: bool = False,
           reads: Any = None, required: bool = False) -> Any:
    """A dataclass field with what the command line and `check` need.

    `flag` defaults to `--field-name`; `minimum`/`maximum` bound a number (inclusive),
    `above` from below (exclusive); every float must be finite; `choices` lists the accepted
    strings. `cli=False` keeps the field out of the command line (set by the library);
    `parse` turns the text given on the command line into the field's value: one text (e.g.
    `1e-5,1e-4`), or for a `repeatable` list field the list of texts, one per use of the flag
    (a list field without a hook is always repeatable). A `Path` field is one of the
    command's reads (`undo_cli.options.paths`); text naming files declares how to find them
    with `reads=` (`named_paths`, `weighted_paths`, `sqlite_path`). `required` options must be
    given on the command line.
    """
    metadata = {"help": help, "flag": flag, "short": short, "metavar": metavar,
                "panel": panel, "cli": cli, "minimum": minimum, "above": above,
                "maximum": maximum, "choices": choices, "parse": parse,
                "repeatable": repeatable, "reads": reads, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(f) -> str:
    """The command-line flag of dataclass field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


SEED_MAX = 2**63 - 1  # seeds are 0 .. 2**63 - 1 (torch takes 64 bits; JSON keeps them exact)
INT_MAX = 2**63 - 1
MAX_RECORDS = 10_000_000  # records a synthetic generator builds in memory (--train-size ...)


def seed_option(help: str, *, panel: str | None = None) -> Any:  # noqa: A002
    """The one declaration of a seed (`--seed` of every command, `--perturb-seed`): 0 ..
    2**63 - 1, default 0, checked as every field is."""
    return option(0, help, panel=panel, minimum=0, maximum=SEED_MAX)


def named_path_option(flag: str, help: str, **extra: Any) -> Any:  # noqa: A002
    """The one declaration of a repeatable `NAME=PATH` option (`--eval`, `probe --data`): each
    value a `NamedPath`, the names unique, every PATH one of the command's declared reads."""
    return option(help=help, metavar="NAME=PATH", factory=list, reads=named_paths,
                  parse=named_path_list(flag), repeatable=True, **extra)


def check_number(flag: str, value: Any, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> None:
    """`UsageError` naming `flag` unless `value` is a finite number in range (inclusive
    `minimum`/`maximum`, exclusive `above`). Used by `check` and by the options a command
    declares with typer itself (`undo init` sizes, `undo perturb --seed`, ...)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number (got {value})")
    if isinstance(value, int) and abs(value) > INT_MAX:
        raise UsageError(f"{flag} is out of range (got {value})")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag} must be at least {minimum:g} (got {value:g})")
    if above is not None and not value > above:
        raise UsageError(f"{flag} must be greater than {above:g} (got {value:g})")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag} must be at most {maximum:g} (got {value:g})")


def check_seed(flag: str, value: int) -> None:
    """`UsageError` naming `flag` for a seed outside 0 .. 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} must be an integer (got {value!r})")
    if not 0 <= value <= SEED_MAX:
        raise UsageError(f"{flag} must lie in 0 .. 2**63 - 1 (got {value})")


class OptionGroup:
    """Base of the option groups (dataclasses of `option(...)` fields): a group settles
    itself when it is built (`settle`), so that an invalid one cannot exist. A group with
    checks across its fields writes its own `__post_init__`, which settles first."""

    def __post_init__(self) -> None:
        settle(self)


def settle(group: Any) -> None:
    """Make a group final where it is built (its `__post_init__`): plain text in a field with
    a `parse` hook becomes the hook's typed value, then `check` validates every field. A
    group that exists is valid; nothing downstream parses or checks it again."""
    for f in fields(group):
        parse = f.metadata.get("parse")
        value = getattr(group, f.name)
        plain = type(value) is str or (isinstance(value, (list, tuple))
                                      and any(type(v) is str for v in value))
        if parse is not None and plain:
            object.__setattr__(group, f.name, parse(value))
    check(group)


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
            check_number(name, v, minimum=meta["minimum"], above=meta["above"],
                         maximum=meta["maximum"])
        if meta["choices"] is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v not in meta["choices"]:
                    raise UsageError(f"{name} must be one of {', '.join(meta['choices'])} "
                                     f"(got {v!r})")
