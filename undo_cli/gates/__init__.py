"""Conditions on metrics for `--stop-when`, `--fail-if` and `--keep-best`: a small, safe
expression language (`expression.py`: grammar, parser, evaluation, the `--fail-if` records),
the names each command's gates use (`namespaces.py`) and `--keep-best`'s objective
(`objective.py`).

Pure Python (it imports only `errors` and `jsontext`), one floor below `undo_cli.options`: an
option group parses its expressions when it is built (`options.text`: `Condition`,
`KeepBest`, `StopWhen`), and everything below the command line takes the parsed value.
"""

from undo_cli.gates.expression import (
    MAX_DEPTH,
    MAX_LENGTH,
    Expr,
    check_gates,
    describe_gate,
    parse_condition,
    parse_expression,
    parse_gates,
    raise_failed_gates,
)
from undo_cli.gates.namespaces import (
    INITIAL,
    REFERENCE_PREFIXES,
    TEACHER,
    VERDICTS,
    WORST,
    StopCondition,
    attack_gate_names,
    attack_gate_values,
    check_eval_gate_names,
    eval_gate_values,
    matrix_gate_values,
    rewrite_string_tests,
)
from undo_cli.gates.objective import Objective, parse_objective

__all__ = [
    "INITIAL", "MAX_DEPTH", "MAX_LENGTH", "REFERENCE_PREFIXES", "TEACHER", "VERDICTS", "WORST",
    "Expr", "Objective", "StopCondition", "attack_gate_names", "attack_gate_values",
    "check_eval_gate_names", "check_gates", "describe_gate", "eval_gate_values",
    "matrix_gate_values", "parse_condition", "parse_expression", "parse_gates",
    "parse_objective", "raise_failed_gates", "rewrite_string_tests",
]
