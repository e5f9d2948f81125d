"""`--help` reads well at any width (issue 29): the paragraphs of a command's description
wrap to the terminal, rather than keeping the docstring's own line breaks inside rich's
layout; lists keep one line per item."""

from __future__ import annotations

import re

import pytest

from undo_cli.cli.helptext import reflow

COMMANDS = ["", "init", "train", "unlearn", "distill", "perturb", "eval", "relearn-attack",
            "probe", "report", "data", "data arithmetic", "data facts"]
ITEM = re.compile(r"^ (?:[-*•]|\d+[.)]) | {3,}")  # a list item or an indented line


def description(output: str) -> list[str]:
    """The lines of the help above the first panel, trailing spaces removed."""
    lines = []
    for line in output.splitlines():
        if line.startswith("╭"):
            break
        lines.append(line.rstrip())
    return lines


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", COMMANDS)
def test_no_paragraph_line_ends_before_half_the_width(cli, command, width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    lines = description(result.output)
    assert max(len(line) for line in lines) <= width
    assert any(lines), result.output
    for here, after in zip(lines, lines[1:]):
        if not here or not after or ITEM.match(after):
            continue  # a paragraph, a list item or a formula ends here
        assert len(here) >= width // 2, f"short line in `undo {command} --help`:\n{here}"


def test_reflow_joins_paragraph_lines_and_keeps_lists_and_formulas():
    text = """First line.

    A paragraph whose
    lines were broken
    by the source.

    Files:
    - one: an item that
      goes on
    - two

    The loss:

        L = KL(p || q)
        + w * MSE
    """
    assert reflow(text) == ("First line.\n\nA paragraph whose lines were broken by the source."
                            "\n\nFiles:\n- one: an item that goes on\n- two\n\nThe loss:\n\n"
                            "    L = KL(p || q)\n    + w * MSE")
    assert reflow("\b\nkeep\n- a\n- b") == "keep\n- a\n- b"
    assert reflow(None) is None
