"""The names gates use, in one place: who measures what, under which prefix.

- `undo eval --fail-if`: `SET.METRIC` (the checkpoint's own metrics) and, with
  `--reference CKPT`, `teacher.SET.METRIC` = `reference.SET.METRIC` (the reference model's on
  the same sets); lm-eval tasks' `TASK.METRIC` are known only once they ran.
- `undo relearn-attack --fail-if`: `worst.SET.METRIC` (every metric at the last step of the
  configuration giving the worst case), `initial.SET.METRIC` (before the attack) and the
  summary numbers `final`, `auc`, `steps_to_threshold` (with a threshold).
- `undo distill --stop-when` (`StopCondition`): `SET.METRIC` of the student, `teacher.SET.METRIC`
  of the teacher, and bare `teacher`, the teacher's value of the one student metric named.
- `undo report --fail-if`: `matrix.FAMILY.MODEL.worst`, `.difference`, `.collapsed`, ... of
  the attack matrix (`matrix_gate_values`); `.verdict == "VERDICT"` is rewritten to a number
  before parsing (`rewrite_string_tests`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from undo_cli.errors import UndoError, UsageError
from undo_cli.gates.expression import Expr, parse_expression
from undo_cli.jsontext import is_finite_number

TEACHER = "teacher"
REFERENCE_PREFIXES = (TEACHER, "reference")  # undo eval --reference
WORST, INITIAL = "worst", "initial"  # undo relearn-attack
SUMMARY_NAMES = ("final", "auc")
THRESHOLD_NAME = "steps_to_threshold"


# ----------------------------------------------------------------------------- intervals

# `SET.METRIC_lower` (how evaluate_model names a bound) is `SET.METRIC.lower` in a gate.
_BOUNDS = {"_lower": ".lower", "_upper": ".upper", "_stderr": ".stderr"}


def with_interval_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` plus each bound and standard error under its gate name: `X.accuracy_upper`
    also as `X.accuracy.upper` (`.lower`, `.upper`: the 95% interval; `.stderr`)."""
    out = dict(values)
    for name, value in values.items():
        for suffix, dotted in _BOUNDS.items():
            if name.endswith(suffix):
                out[name[:-len(suffix)] + dotted] = value
    return out


def interval_names(names: Iterable[str]) -> list[str]:
    """`names` plus the gate names of their bounds (`with_interval_names`)."""
    return list(with_interval_names(dict.fromkeys(names)))


# ----------------------------------------------------------------------------- undo eval


def check_eval_gate_names(gates: Sequence[Expr], metrics: Iterable[str], tasks: Sequence[str],
                          reference: bool) -> None:
    """`UsageError` (exit 2) for a gate name that no set gives, before any model is loaded.

    Known: `metrics` (`SET.METRIC`), and with a reference those under each of
    `REFERENCE_PREFIXES`; names under an lm-eval task are checked once the task ran.
    """
    own = interval_names(metrics)
    known = set(own)
    if reference:
        known |= {f"{prefix}.{name}" for prefix in REFERENCE_PREFIXES for name in own}
    for expr in gates:
        deferred = set()
        for name in expr.names():
            parts = name.split(".")
            if reference and len(parts) > 1 and parts[0] in REFERENCE_PREFIXES:
                parts = parts[1:]
            if parts[0] in tasks:
                deferred.add(name)
            elif name not in known and parts[0] in REFERENCE_PREFIXES and not reference:
                raise UsageError(f"--fail-if {expr.text!r} uses {name!r}: give --reference "
                                 "CKPT to compare with a reference model's metrics")
        expr.check_names(known | deferred)


def eval_gate_values(metrics: Mapping[str, Any],
                     reference: Mapping[str, Any] | None) -> dict[str, Any]:
    """The values a checkpoint's `undo eval` gates read: its flat metrics and the reference's
    under each of `REFERENCE_PREFIXES`."""
    values = with_interval_names(metrics)
    for name, value in with_interval_names(reference or {}).items():
        for prefix in REFERENCE_PREFIXES:
            values[f"{prefix}.{name}"] = value
    return values


# ----------------------------------------------------------------------------- relearn-attack


def attack_gate_names(metrics: Iterable[str], threshold: float | None) -> list[str]:
    """The names an attack's `--fail-if` may use, known before any work."""
    metrics = interval_names(metrics)
    names = [f"{prefix}.{m}" for prefix in (WORST, INITIAL) for m in metrics]
    names += list(SUMMARY_NAMES) + [f"{n}.{b}" for n in SUMMARY_NAMES for b in ("lower", "upper")]
    if threshold is not None:
        names.append(THRESHOLD_NAME)
    return names


def attack_gate_values(worst: Mapping[str, Any], initial: Mapping[str, Any],
                       summary: Mapping[str, Any]) -> dict[str, float]:
    """The values an attack's gates read: `worst` (every metric at the end of the worst
    case; for the forget metric its `.lower`/`.upper` are the worst case's own 95% band),
    `initial` and the `summary` numbers (`final`, `auc` and their bands); steps to a
    threshold never reached is infinite."""
    values = {f"{WORST}.{name}": value for name, value in with_interval_names(worst).items()}
    values.update({f"{INITIAL}.{name}": v for name, v in with_interval_names(initial).items()
                   if is_finite_number(v)})
    for name in SUMMARY_NAMES:
        for key, gate in ((name, name), (f"{name}_lower", f"{name}.lower"),
                          (f"{name}_upper", f"{name}.upper")):
            if is_finite_number(summary.get(key)):
                values[gate] = summary[key]
    if summary.get("threshold") is not None:
        steps = summary.get(THRESHOLD_NAME)
        values[THRESHOLD_NAME] = math.inf if steps is None else steps
    return values


# ----------------------------------------------------------------------------- distill


class StopCondition:
    """`--stop-when`: a gate expression comparing student metrics with the teacher's.

    Names are `SET.METRIC` (the student's metric on an `--eval` set), `teacher.SET.METRIC` (the
    teacher's, measured once before training), or bare `teacher`: the teacher's value of the
    one student metric in the expression, e.g. `retain.accuracy >= teacher - 0.05`.
    """

    def __init__(self, text: str):
        self.text = text
        try:
            self.expr = parse_expression(text)
        except UsageError as e:
            raise UsageError(f"--stop-when: {e}") from e
        names = set(self.expr.names())
        self.student_names = sorted(n for n in names if n != "teacher"
                                    and not n.startswith("teacher."))
        self.teacher_names = sorted(n for n in names if n.startswith("teacher."))
        self.bare_teacher = "teacher" in names
        if self.bare_teacher and len(self.student_names) != 1:
            raise UsageError(f"--stop-when {text!r}: bare 'teacher' needs exactly one student "
                             "metric to refer to; name it as teacher.SET.METRIC instead")
        if not self.student_names:
            raise UsageError(f"--stop-when {text!r} names no student metric (SET.METRIC)")

    def metrics_needed(self) -> set[str]:
        """Flat metric names (`SET.METRIC`) the condition reads, student and teacher alike."""
        return set(self.student_names) | {n[len("teacher."):] for n in self.teacher_names}

    def check_names(self, available: set[str]) -> None:
        """`UsageError` if the condition reads a metric the eval sets do not produce."""
        missing = sorted(self.metrics_needed() - available)
        if missing:
            raise UsageError(f"--stop-when {self.text!r}: unknown metric(s) {', '.join(missing)}; "
                             f"available: {', '.join(sorted(available)) or 'none (add --eval)'}")

    def holds(self, student: dict[str, float], teacher: dict[str, float]) -> bool:
        values = dict(student)
        values.update({f"teacher.{k}": v for k, v in teacher.items()})
        if self.bare_teacher:
            values["teacher"] = teacher[self.student_names[0]]
        try:
            return bool(self.expr.evaluate(values))
        except UndoError:  # a NaN metric (diverging student) never satisfies the condition
            return False


# ----------------------------------------------------------------------------- undo report

VERDICTS = ("recovered", "teaches", "level", "below oracle", "oracle")  # undo_cli.matrix's


def matrix_gate_values(matrix: Mapping[str, Any]) -> dict[str, Any]:
    """The names `undo report --fail-if` reads: `matrix.FAMILY.MODEL.worst`,
    `.worst_no_limit`, `.difference`, `.recovered`, `.collapsed` (1 or 0) and
    `.verdict_is_VERDICT` / `.verdict_no_limit_is_VERDICT` (1 or 0), which
    `verdict == "VERDICT"` is rewritten to (`rewrite_string_tests`). Family and model names
    become letters, digits and `_` (`ablate-direction` -> `ablate_direction`)."""
    values: dict[str, Any] = {}
    for family, row in matrix["cells"].items():
        for model, cell in row.items():
            head = f"matrix.{_segment(family)}.{_segment(model)}"
            values[f"{head}.worst"] = cell.get("worst")
            values[f"{head}.worst_no_limit"] = cell.get("worst_no_limit")
            for kind in ("verdict", "verdict_no_limit"):
                for verdict in (*VERDICTS, "none"):
                    values[f"{head}.{kind}_is_{_segment(verdict)}"] = float(
                        (cell.get(kind) or "none") == verdict)
            values[f"{head}.recovered"] = float(cell.get("verdict") == "recovered")
            values[f"{head}.collapsed"] = float(bool(cell.get("collapsed")))
            if cell.get("difference") is not None:
                values[f"{head}.difference"] = cell["difference"]
    return values


_STRING_TEST = re.compile(r"""([A-Za-z][A-Za-z0-9_.]*\.verdict(?:_no_limit)?)\s*(==|!=)\s*"""
                          r"""(["'])([^"']*)\3""")


def rewrite_string_tests(text: str) -> str:
    """`matrix.prune.undo.verdict == "recovered"` -> `matrix.prune.undo.verdict_is_recovered
    == 1` (the gate language compares numbers; a verdict is one of `VERDICTS`)."""

    def replace(m: re.Match) -> str:
        verdict = m.group(4).strip()
        if verdict not in (*VERDICTS, "none"):
            raise UsageError(f"--fail-if {text!r}: a verdict is one of "
                             f"{', '.join(repr(v) for v in VERDICTS)} (got {verdict!r})")
        return f"{m.group(1)}_is_{_segment(verdict)} {m.group(2)} 1"

    return _STRING_TEST.sub(replace, text)


def _segment(text: str) -> str:
    """A gate-name segment: letters, digits and `_` (`ablate-direction` -> `ablate_direction`)."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in str(text))
    return out if out and out[0].isalpha() else f"m_{out}"
