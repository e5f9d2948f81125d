"""Strict JSON for every file and `--json` document undo writes.

Python's `json` writes NaN and infinities as the bare words `NaN` and `Infinity`, which
strict parsers (jq before 1.7, JavaScript's `JSON.parse`, Go, Rust's serde) reject. undo
writes them as `null` instead: a metric that is null is "not a finite number".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool) with a finite value: a metric that
    counts (NaN, infinities and missing values do not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of `value`: NaN and +-inf -> None, tuples -> lists, dict keys -> str,
    Paths and other unknown objects -> str, numpy and 0-d torch numbers -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return str(value)


def to_json(value: Any, **options: Any) -> str:
    """`json.dumps` of `jsonable(value)`; `allow_nan=False` proves nothing non-finite is left."""
    return json.dumps(jsonable(value), allow_nan=False, **options)
