"""The gate expression language of --stop-when / --fail-if: parsing, precedence, safety."""

from __future__ import annotations

import math

import pytest

from undo_cli.errors import UndoError, UsageError
from undo_cli.gates import MAX_DEPTH, parse_condition, parse_expression

METRICS = {
    "retain.accuracy": 0.90,
    "forget.accuracy": 0.02,
    "teacher": 0.93,
    "teacher.retain.accuracy": 0.95,
    "worst.forget.accuracy": 0.30,
}


def value(text: str, values: dict | None = None):
    return parse_expression(text).evaluate(METRICS if values is None else values)


# ----------------------------------------------------------------------------- meaning


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", 7.0),
    ("(1 + 2) * 3", 9.0),
    ("2 - 3 - 4", -5.0),  # left-associative
    ("8 / 4 / 2", 1.0),
    ("2 * 3 / 4", 1.5),
    ("-2 * 3", -6.0),
    ("-(1 + 2) * 3", -9.0),
    ("- -1", 1.0),
    ("+.5 + 1e-1 + 2E1 + 3.", 23.6),
    ("1 - -1", 2.0),
    ("10 - 2 * 3 - 1", 3.0),
])
def test_arithmetic_precedence(text, expected):
    result = value(text)
    assert isinstance(result, float) and math.isclose(result, expected)


@pytest.mark.parametrize("text, expected", [
    ("retain.accuracy >= teacher - 0.05", True),  # 0.90 >= 0.88
    ("retain.accuracy >= teacher - 0.02", False),
    ("forget.accuracy > 0.05", False),
    ("retain.accuracy < teacher.retain.accuracy - 0.03", True),
    ("worst.forget.accuracy > 0.25", True),
    ("1 < 2 == 2", True),  # chains like Python: 1 < 2 and 2 == 2
    ("3 > 2 > 1", True),
    ("1 < 3 < 2", False),
    ("1 != 1", False),
    ("1 == 1.0", True),
    ("1 <= 1 and 1 >= 1", True),
    # `not` binds tighter than `and`, which binds tighter than `or`.
    ("1 > 2 and 1 > 2 or 1 < 2", True),
    ("1 < 2 or 1 > 2 and 1 > 2", True),
    ("(1 < 2 or 1 > 2) and 1 > 2", False),
    ("not 1 > 2 and 1 > 2", False),
    ("not (1 > 2 and 1 > 2)", True),
    ("not not 1 < 2", True),
    ("1 + 1 > 1 * 1", True),  # arithmetic binds tighter than comparisons
    ("0.2 < worst.forget.accuracy <= 0.5", True),
])
def test_conditions(text, expected):
    result = value(text)
    assert isinstance(result, bool) and result is expected


def test_names_and_canonical_form():
    expr = parse_expression("retain.accuracy < teacher.retain.accuracy - 0.03 or "
                            "not forget.accuracy > 0.05")
    assert expr.names() == {"retain.accuracy", "teacher.retain.accuracy", "forget.accuracy"}
    assert expr.is_condition
    assert str(expr) == ("((retain.accuracy < (teacher.retain.accuracy - 0.03)) or "
                         "(not (forget.accuracy > 0.05)))")
    assert parse_expression("1 + 2").names() == set()
    assert not parse_expression("teacher - 0.05").is_condition


def test_nested_and_flat_values():
    expr = parse_expression("teacher.retain.accuracy - retain.accuracy > 0.04")
    flat = {"teacher.retain.accuracy": 0.95, "retain.accuracy": 0.9}
    nested = {"teacher": {"retain": {"accuracy": 0.95}}, "retain": {"accuracy": 0.9}}
    mixed = {"teacher": {"retain.accuracy": 0.95}, "retain.accuracy": 0.9}
    assert expr.evaluate(flat) and expr.evaluate(nested) and expr.evaluate(mixed)
    # A name and a prefix of it can both be known (teacher and teacher.retain.accuracy).
    assert value("teacher + teacher.retain.accuracy > 1.8")
    # Integers, booleans and numeric strings are numbers.
    assert parse_expression("a + b + c").evaluate({"a": 1, "b": True, "c": "0.5"}) == 2.5


def test_values_are_never_evaluated_as_code():
    expr = parse_expression("x > 1")
    with pytest.raises(UsageError, match="not a number"):
        expr.evaluate({"x": "__import__('os').system('false')"})


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, message, column", [
    ("retain.accuracy >= teacher -", "ends early", 29),
    ("retain.accuracy >= ", "ends early", 20),
    ("(1 + 2", "expected ')'", 7),
    ("1 + 2)", "unexpected ')'", 6),
    ("a = 1", "use '=='", 3),
    ("a && b", "use 'and'", 3),
    ("a || b", "use 'or'", 3),
    ("!a", "use 'not'", 1),
    ("a and 1 < 2", "'and' needs a condition", 1),
    ("1 < 2 or b", "'or' needs a condition", 10),
    ("not 3", "'not' needs a condition", 5),
    ("x < (y < z)", "comparison needs a number", 5),
    ("(a < 1) + 1", "'+' needs a number", 1),
    ("-(a < 1)", "'-' needs a number", 2),
    ("1 2", "unexpected '2'", 3),
    ("retain accuracy > 1", "unexpected 'accuracy'", 8),
    ("5x > 1", "cannot follow a number", 2),
    ("a. > 1", "unexpected character '.'", 2),
    ("a[0] > 1", "no indexing", 2),
    ("f(x) > 1", "no function calls", 2),
    ("50% > 1", "fractions", 3),
    ("x > 1 and", "ends early", 10),
    ("* 2", "unexpected '*'", 1),
])
def test_malformed_text_names_the_column(text, message, column):
    with pytest.raises(UsageError) as info:
        parse_expression(text, "--fail-if")
    text_of_error = str(info.value)
    assert message in text_of_error
    assert f"at column {column}" in text_of_error
    assert text_of_error.startswith("cannot parse --fail-if ")
    assert "\n" not in text_of_error


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('echo hacked')",
    "os.system('ls') > 0",
    "open('/etc/passwd')",
    "().__class__.__bases__[0].__subclasses__()",
    "exec('1')",
    "lambda: 0",
    "[x for x in ()]",
    "x if 1 else 0",
    "x ** 2 > 1",
    "'a' == 'a'",
    "a; b",
    "a\\b",
    "x.__class__ > 1",
])
def test_python_code_is_refused(text):
    with pytest.raises(UsageError, match="cannot parse"):
        parse_expression(text)


def test_builtins_are_just_unknown_names():
    # Words that are Python builtins are ordinary metric names here: never resolved to code.
    for text in ("open > 1", "eval > 0", "exit > 0"):
        with pytest.raises(UsageError, match="unknown name"):
            parse_expression(text).evaluate(METRICS)


def test_empty_long_and_deep_expressions():
    for text in ("", "   "):
        with pytest.raises(UsageError, match="empty"):
            parse_expression(text)
    with pytest.raises(UsageError, match="longer than"):
        parse_expression("1 + " * 1000 + "1")
    deep = "(" * (MAX_DEPTH + 5) + "1" + ")" * (MAX_DEPTH + 5)
    with pytest.raises(UsageError, match="nested more than"):
        parse_expression(deep)
    with pytest.raises(UsageError, match="nested more than"):
        parse_expression("-" * (MAX_DEPTH + 5) + "1")
    with pytest.raises(UsageError, match="nested more than"):
        parse_expression("not " * (MAX_DEPTH + 5) + "1 > 0")
    ok = "(" * 10 + "1" + ")" * 10
    assert parse_expression(ok).evaluate({}) == 1.0


def test_unknown_names_are_named_with_a_suggestion():
    expr = parse_expression("retaim.accuracy > 0.5")
    with pytest.raises(UsageError) as info:
        expr.evaluate(METRICS)
    message = str(info.value)
    assert "'retaim.accuracy'" in message and "did you mean 'retain.accuracy'" in message
    assert "forget.accuracy" in message  # the known names are listed
    with pytest.raises(UsageError, match="unknown name 'x'"):
        parse_expression("x > 1").evaluate({})
    # Every operand is evaluated: an unknown name is reported even when `or` is decided.
    with pytest.raises(UsageError, match="unknown name 'missing'"):
        parse_expression("1 < 2 or missing > 0").evaluate({})


def test_check_names_before_a_run():
    expr = parse_expression("retain.accuracy >= teacher - 0.05")
    expr.check_names(["retain.accuracy", "teacher", "forget.accuracy"])
    with pytest.raises(UsageError, match="unknown name 'teacher'"):
        expr.check_names(["retain.accuracy"])


def test_nan_and_division_by_zero_fail_loudly():
    with pytest.raises(UndoError, match="NaN"):
        parse_expression("loss > 10").evaluate({"loss": float("nan")})
    with pytest.raises(UndoError, match="division by zero"):
        parse_expression("a / (b - b) > 1").evaluate({"a": 1, "b": 2})
    assert parse_expression("loss > 10").evaluate({"loss": float("inf")}) is True


def test_parse_condition_requires_true_or_false():
    assert parse_condition("forget.accuracy > 0.05").evaluate(METRICS) is False
    with pytest.raises(UsageError, match="not a condition"):
        parse_condition("retain.accuracy", "--stop-when")
    with pytest.raises(UsageError, match="not a condition"):
        parse_condition("teacher - 0.05")
