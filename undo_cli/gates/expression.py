"""Conditions on metrics for `--stop-when` and `--fail-if`: a small, safe expression language.

    retain.accuracy >= teacher - 0.05
    forget.accuracy > 0.05 or worst.forget.accuracy > 0.25
    not (retain.accuracy < teacher.retain.accuracy - 0.03)

Grammar (lowest precedence first; nothing else is accepted, and nothing is ever handed to
Python's `eval`):

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)*
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := ("-" | "+") unary | atom
    atom       := NUMBER | NAME | "(" expr ")"

NUMBER is a decimal such as `3`, `0.05`, `.5` or `1e-3`. NAME is a dotted metric name:
segments of letters, digits and `_`, none starting with `_`, the first with a letter
(`retain.accuracy`, `teacher.retain.accuracy`, `worst.forget.accuracy`); `and`, `or` and
`not` are reserved.
Comparisons chain as in Python (`0.2 < x <= 0.5`). Types are checked when parsing:
arithmetic and comparisons take numbers, `and` / `or` / `not` take conditions.

Evaluating looks names up in a mapping of metric values, either flat
(`{"retain.accuracy": 0.9}`) or nested (`{"retain": {"accuracy": 0.9}}`). An unknown name
is a `UsageError` listing the known ones; a NaN value or a division by zero is an
`UndoError`, so a gate never passes silently on a diverged metric.

`--fail-if` gates (shared by every command that has them): `parse_gates` when the option group
is built (`undo_cli.options.text.conditions`), `check_gates` on the measured values
(`[{"expression", "failed", "values"}]`, the JSON record of each gate), then
`raise_failed_gates` (`GateFailed`, exit 3, one line naming each failed gate with its measured
values) after the results are written.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from undo_cli.errors import GateFailed, UndoError, UsageError

MAX_LENGTH = 2000
MAX_DEPTH = 50
MAX_TOKENS = 200  # numbers, names and operators: bounds the depth of the tree it becomes
KEYWORDS = ("and", "or", "not")
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\))
""", re.VERBOSE)
_HINTS = {"=": "use '==' to compare", "&": "use 'and'", "|": "use 'or'", "!": "use 'not'",
          "'": "strings are not part of the language", '"': "strings are not part of the "
          "language", "_": "names start with a letter", ",": "there are no function calls",
          "[": "there is no indexing", "%": "write percentages as fractions (0.05)"}


@dataclass(frozen=True)
class _Token:
    kind: str  # number, name, op, keyword, end
    text: str
    pos: int  # 0-based offset in the source


# ----------------------------------------------------------------------------- tree


class Expr:
    """A parsed expression: `names()`, `evaluate(values)`, `is_condition`, `text`."""

    kind: str  # "num" or "bool"
    pos: int
    text: str = ""  # the source, set on the root by `parse_expression`

    @property
    def is_condition(self) -> bool:
        """True when the expression evaluates to a boolean (a comparison or and/or/not)."""
        return self.kind == "bool"

    def names(self) -> set[str]:
        """The metric names the expression uses."""
        out: set[str] = set()
        self._collect(out)
        return out

    def evaluate(self, values: Mapping[str, Any]) -> bool | float:
        """The value of the expression with names looked up in `values` (flat or nested).

        `UsageError` for an unknown name or a value that is not a number; `UndoError` for a
        NaN value or a division by zero.
        """
        return self._eval(_Lookup(values, self.text))

    def check_names(self, known: Iterable[str]) -> None:
        """`UsageError` if the expression uses a name outside `known` (check before a run)."""
        known = set(known)
        for name in sorted(self.names()):
            if name not in known:
                raise _unknown(name, self.text, sorted(known))

    def _collect(self, out: set[str]) -> None:
        for child in self._children():
            child._collect(out)

    def _children(self) -> tuple[Expr, ...]:
        return ()

    def _eval(self, lookup: _Lookup) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:  # pragma: no cover - overridden
        return self.text


class _Num(Expr):
    kind = "num"

    def __init__(self, value: float, pos: int):
        self.value, self.pos = value, pos

    def _eval(self, lookup: _Lookup) -> float:
        return self.value

    def __str__(self) -> str:
        return repr(self.value)


class _Name(Expr):
    kind = "num"

    def __init__(self, name: str, pos: int):
        self.name, self.pos = name, pos

    def _collect(self, out: set[str]) -> None:
        out.add(self.name)

    def _eval(self, lookup: _Lookup) -> float:
        return lookup(self.name)

    def __str__(self) -> str:
        return self.name


class _Unary(Expr):
    kind = "num"

    def __init__(self, op: str, operand: Expr, pos: int):
        self.op, self.operand, self.pos = op, operand, pos

    def _children(self) -> tuple[Expr, ...]:
        return (self.operand,)

    def _eval(self, lookup: _Lookup) -> float:
        value = self.operand._eval(lookup)
        return -value if self.op == "-" else value

    def __str__(self) -> str:
        return f"({self.op}{self.operand})"


class _Arith(Expr):
    kind = "num"

    def __init__(self, op: str, left: Expr, right: Expr, pos: int):
        self.op, self.left, self.right, self.pos = op, left, right, pos

    def _children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)

    def _eval(self, lookup: _Lookup) -> float:
        a, b = self.left._eval(lookup), self.right._eval(lookup)
        if self.op == "+":
            return a + b
        if self.op == "-":
            return a - b
        if self.op == "*":
            return a * b
        if b == 0:
            raise UndoError(f"division by zero evaluating {lookup.text!r} "
                            f"({self.right} is 0)")
        return a / b

    def __str__(self) -> str:
        return f"({self.left} {self.op} {self.right})"


class _Compare(Expr):
    kind = "bool"

    def __init__(self, operands: list[Expr], ops: list[str], pos: int):
        self.operands, self.ops, self.pos = operands, ops, pos

    def _children(self) -> tuple[Expr, ...]:
        return tuple(self.operands)

    def _eval(self, lookup: _Lookup) -> bool:
        left = self.operands[0]._eval(lookup)
        for op, operand in zip(self.ops, self.operands[1:]):
            right = operand._eval(lookup)
            if not COMPARISONS[op](left, right):
                return False
            left = right
        return True

    def __str__(self) -> str:
        parts = [str(self.operands[0])]
        for op, operand in zip(self.ops, self.operands[1:]):
            parts += [op, str(operand)]
        return "(" + " ".join(parts) + ")"


class _Logic(Expr):
    kind = "bool"

    def __init__(self, op: str, operands: list[Expr], pos: int):
        self.op, self.operands, self.pos = op, operands, pos

    def _children(self) -> tuple[Expr, ...]:
        return tuple(self.operands)

    def _eval(self, lookup: _Lookup) -> bool:
        # Every operand is evaluated (no short circuit), so an unknown name is always reported.
        results = [operand._eval(lookup) for operand in self.operands]
        return all(results) if self.op == "and" else any(results)

    def __str__(self) -> str:
        return "(" + f" {self.op} ".join(map(str, self.operands)) + ")"


class _Not(Expr):
    kind = "bool"

    def __init__(self, operand: Expr, pos: int):
        self.operand, self.pos = operand, pos

    def _children(self) -> tuple[Expr, ...]:
        return (self.operand,)

    def _eval(self, lookup: _Lookup) -> bool:
        return not self.operand._eval(lookup)

    def __str__(self) -> str:
        return f"(not {self.operand})"


class _Lookup:
    """Resolves names against flat or nested metric mappings, with helpful errors."""

    def __init__(self, values: Mapping[str, Any], text: str):
        self.values, self.text = values, text

    def __call__(self, name: str) -> float:
        value = self._find(name)
        if value is _MISSING:
            raise _unknown(name, self.text, sorted(_flat_names(self.values)))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UsageError(f"{name!r} in {self.text!r} is not a number "
                                 f"({value!r})") from None
        value = float(value)
        if math.isnan(value):
            raise UndoError(f"{name!r} is NaN: cannot evaluate {self.text!r}")
        return value

    def _find(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest flat prefix, then nested parts
            head = ".".join(parts[:i])
            if head in self.values and isinstance(self.values[head], Mapping):
                found = _Lookup(self.values[head], self.text)._find(".".join(parts[i:]))
                if found is not _MISSING:
                    return found
        return _MISSING


_MISSING = object()


def _unknown(name: str, text: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
    return UsageError(f"unknown name {name!r} in {text!r}{hint} (known: {listed or 'none'})")


def _flat_names(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.extend(_flat_names(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


# ----------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, text: str, what: str | None):
        self.text = text
        self.prefix = f"{what} {text!r}" if what else repr(text)
        self.tokens = self._tokenize()
        self.i = 0
        self.depth = 0

    def error(self, message: str, pos: int) -> UsageError:
        near = self.text[pos:pos + 12].strip()
        where = f"at column {pos + 1}" + (f" (near {near!r})" if near else " (at the end)")
        return UsageError(f"cannot parse {self.prefix}: {message} {where}")

    def _tokenize(self) -> list[_Token]:
        tokens, pos = [], 0
        while pos < len(self.text):
            m = _TOKEN.match(self.text, pos)
            if m is None:
                ch = self.text[pos]
                hint = _HINTS.get(ch)
                raise self.error(f"unexpected character {ch!r}" + (f" ({hint})" if hint else ""),
                                 pos)
            kind = m.lastgroup
            assert kind is not None
            if kind == "name" and m.group() in KEYWORDS:
                kind = "keyword"
            elif kind == "name" and pos > 0 and self.text[pos - 1] in "0123456789.":
                raise self.error("a name cannot follow a number directly", pos)
            if kind != "space":
                tokens.append(_Token(kind, m.group(), pos))
            pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise UsageError(f"{self.prefix[:60]}...: more than {MAX_TOKENS} numbers, names and "
                             "operators; split it into several expressions")
        tokens.append(_Token("end", "", len(self.text)))
        return tokens

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, *texts: str) -> bool:
        token = self.peek()
        return token.kind in ("op", "keyword") and token.text in texts

    def need(self, node: Expr, kind: str, context: str) -> Expr:
        if node.kind != kind:
            what = "a number" if kind == "num" else "a condition (a comparison)"
            got = "a condition" if node.kind == "bool" else "a number"
            raise self.error(f"{context} needs {what}, not {got}", node.pos)
        return node

    def parse(self) -> Expr:
        if not self.text.strip():
            raise UsageError(f"{self.prefix}: the expression is empty")
        node = self.expr()
        token = self.peek()
        if token.kind != "end":
            problem = "unexpected '('; there are no function calls" if token.text == "(" \
                else f"unexpected {token.text!r}; expected an operator or the end"
            raise self.error(problem, token.pos)
        return node

    def expr(self) -> Expr:
        return self._logic("or", self.and_expr)

    def and_expr(self) -> Expr:
        return self._logic("and", self.not_expr)

    def _logic(self, op: str, operand: Callable[[], Expr]) -> Expr:
        first = operand()
        if not self.at(op):
            return first
        operands = [self.need(first, "bool", f"'{op}'")]
        while self.at(op):
            self.take()
            operands.append(self.need(operand(), "bool", f"'{op}'"))
        return _Logic(op, operands, first.pos)

    def not_expr(self) -> Expr:
        if self.at("not"):
            token = self.take()
            with self._nested(token.pos):
                operand = self.not_expr()
            return _Not(self.need(operand, "bool", "'not'"), token.pos)
        return self.comparison()

    def comparison(self) -> Expr:
        first = self.sum()
        if not self.at(*COMPARISONS):
            return first
        operands, ops = [self.need(first, "num", "a comparison")], []
        while self.at(*COMPARISONS):
            ops.append(self.take().text)
            operands.append(self.need(self.sum(), "num", "a comparison"))
        return _Compare(operands, ops, first.pos)

    def sum(self) -> Expr:
        node = self.product()
        while self.at("+", "-"):
            op = self.take().text
            left = self.need(node, "num", f"'{op}'")
            node = _Arith(op, left, self.need(self.product(), "num", f"'{op}'"), node.pos)
        return node

    def product(self) -> Expr:
        node = self.unary()
        while self.at("*", "/"):
            op = self.take().text
            left = self.need(node, "num", f"'{op}'")
            node = _Arith(op, left, self.need(self.unary(), "num", f"'{op}'"), node.pos)
        return node

    def unary(self) -> Expr:
        if self.at("-", "+"):
            token = self.take()
            with self._nested(token.pos):
                operand = self.unary()
            return _Unary(token.text, self.need(operand, "num", f"'{token.text}'"), token.pos)
        return self.atom()

    def atom(self) -> Expr:
        token = self.take()
        if token.kind == "number":
            return _Num(float(token.text), token.pos)
        if token.kind == "name":
            return _Name(token.text, token.pos)
        if token.text == "(" and token.kind == "op":
            with self._nested(token.pos):
                node = self.expr()
            close = self.take()
            if close.text != ")":
                raise self.error(f"expected ')' (to close the '(' of column {token.pos + 1})",
                                 close.pos)
            node.pos = token.pos  # messages about a parenthesised part point at its '('
            return node
        if token.kind == "end":
            raise self.error("the expression ends early; expected a number, a name or '('",
                             token.pos)
        raise self.error(f"unexpected {token.text!r}; expected a number, a name or '('",
                         token.pos)

    @contextmanager
    def _nested(self, pos: int) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", pos)
        try:
            yield
        finally:
            self.depth -= 1


def parse_expression(text: str, what: str | None = None) -> Expr:
    """Parse `text` into an `Expr`; `UsageError` with the column of the problem otherwise.

    `what` (e.g. "--fail-if") prefixes error messages.
    """
    if not isinstance(text, str):
        raise UsageError(f"{what or 'expression'}: expected text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise UsageError(f"{what or 'expression'}: longer than {MAX_LENGTH} characters")
    node = _Parser(text, what).parse()
    node.text = text
    return node


def parse_condition(text: str, what: str | None = None) -> Expr:
    """Like `parse_expression`, but the expression must be a condition (true or false):
    a comparison, or comparisons joined by and / or / not."""
    node = parse_expression(text, what)
    if not node.is_condition:
        prefix = f"{what} {text!r}" if what else repr(text)
        raise UsageError(f"{prefix} is a number, not a condition: compare it, e.g. "
                         f"'{text.strip()} > 0.5'")
    return node


# ----------------------------------------------------------------------------- gates


def parse_gates(expressions: Sequence[str], known: Iterable[str] | None = None,
                what: str = "--fail-if") -> list[Expr]:
    """Parse gate conditions (`UsageError`, exit 2, if one is malformed) and, given `known`,
    check their names. Call it before any work."""
    parsed = [parse_condition(text, what) for text in expressions]
    if known is not None:
        known = set(known)
        for expr in parsed:
            expr.check_names(known)
    return parsed


def check_gates(gates: Sequence[Expr], values: Mapping[str, Any],
                **extra: Any) -> list[dict[str, Any]]:
    """Evaluate each gate on `values` (flat or nested): `[{"expression", "failed",
    "values": {name: value}, **extra}]`. A gate fails when its condition holds.

    `extra` (e.g. `checkpoint=...`) is added to every record and named by
    `describe_gate`. Errors as `Expr.evaluate` (unknown name, NaN value).
    """
    out = []
    for expr in gates:
        failed = bool(expr.evaluate(values))
        lookup = _Lookup(values, expr.text)
        used = {}
        for name in sorted(expr.names()):
            found = lookup._find(name)
            used[name] = None if found is _MISSING else found
        out.append({**extra, "expression": expr.text, "failed": failed, "values": used})
    return out


def describe_gate(record: Mapping[str, Any]) -> str:
    """`forget.accuracy > 0.05 (forget.accuracy = 0.31) for CKPT` (the checkpoint if the
    record names one)."""
    shown = ", ".join(f"{name} = {_show(value)}" for name, value in record["values"].items())
    text = record["expression"].strip() + (f" ({shown})" if shown else "")
    if record.get("checkpoint"):
        text += f" for {record['checkpoint']}"
    return text


def raise_failed_gates(records: Sequence[Mapping[str, Any]]) -> None:
    """`GateFailed` (exit 3) naming every failed gate with its measured values, on one line:
    `gate failed: EXPR (NAME = VALUE) [for CKPT]; ...`. Nothing if every gate passed."""
    failed = [r for r in records if r["failed"]]
    if failed:
        noun = "gate failed" if len(failed) == 1 else f"{len(failed)} gates failed"
        raise GateFailed(f"{noun}: " + "; ".join(describe_gate(r) for r in failed))


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
