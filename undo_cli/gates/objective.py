"""`--keep-best`: which evaluation of a run is the best one.

    retain.accuracy                              a metric: accuracies up, losses down
    max retain.accuracy - forget.accuracy        max or min of an expression (gate syntax)
    min(retain.loss + forget.accuracy)

A bare metric's direction comes from its name: `*.loss` and `*.ppl` are minimised, every
other metric (accuracy, accuracy_norm, exact_match, ...) maximised; an expression of several
names must say `max` or `min`. The value is computed with the gate language
(`expression.py`); a NaN value is never the best, and a tie keeps the earlier evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from undo_cli.errors import UndoError, UsageError
from undo_cli.gates.expression import Expr, parse_expression

FLAG = "--keep-best"
LOWER_IS_BETTER = ("loss", "ppl")
_DIRECTION = re.compile(r"^\s*(max|min)\b\s*(.*)$", re.DOTALL)


@dataclass
class Objective:
    """What `--keep-best` maximises or minimises."""

    text: str
    expr: Expr
    maximize: bool

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The objective on one evaluation's flat metrics (NaN when a metric is NaN)."""
        try:
            return float(self.expr.evaluate(metrics))
        except UsageError:
            raise
        except UndoError:  # a NaN metric or a division by zero
            return math.nan

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` (None: nothing yet); NaN never does."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.maximize else value < best

    def check_names(self, known: Iterable[str]) -> None:
        """`UsageError` if the objective uses a metric the eval sets do not produce."""
        try:
            self.expr.check_names(known)
        except UsageError as e:
            raise UsageError(f"{FLAG}: {e}") from None

    def describe(self) -> dict[str, Any]:
        return {"metric": self.text, "mode": "max" if self.maximize else "min"}


def parse_objective(text: str) -> Objective:
    """`--keep-best TEXT` as an `Objective`; `UsageError` naming the flag otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{FLAG} is empty: give a metric such as retain.accuracy")
    m = _DIRECTION.match(text)
    body = m.group(2) if m else text
    if not body.strip():
        raise UsageError(f"{FLAG} {text!r}: {m.group(1)} of what? e.g. "
                         f"'{m.group(1)} retain.accuracy'")
    expr = parse_expression(body, FLAG)
    if expr.is_condition:
        raise UsageError(f"{FLAG} {text!r} is a condition, not a number to maximise: give a "
                         "metric or an expression, e.g. 'max retain.accuracy - forget.accuracy'")
    if m:
        return Objective(text.strip(), expr, m.group(1) == "max")
    names = expr.names()
    if len(names) != 1 or body.strip() not in names:
        raise UsageError(f"{FLAG} {text!r}: say whether to maximise or minimise it, e.g. "
                         f"'max {body.strip()}' or 'min {body.strip()}'")
    name = next(iter(names))
    return Objective(text.strip(), expr, name.rsplit(".", 1)[-1] not in LOWER_IS_BETTER)
