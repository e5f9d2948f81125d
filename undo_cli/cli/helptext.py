"""Help that reads well at any width: the line breaks of a docstring's paragraphs are the
source's, not the reader's, so they are joined and rich wraps each paragraph to the terminal.

Lines that carry meaning keep their breaks: list items (`- `, `* `, `1. ` at the start of a
line; an item's indented continuation joins the item) and indented lines (formulas,
commands). Click's `\\b` marker (keep this paragraph's lines) is dropped: its lists keep their
items either way.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

ITEM = re.compile(r"^(?:[-*•]|\d+[.)])\s")


def reflow(text: str | None) -> str | None:
    """`text` with each paragraph's lines joined, lists and indented lines kept."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        paragraph = paragraph.removeprefix("\b\n")  # click's "keep my lines": lists do
        lines: list[list[Any]] = []  # [text, kind]: kind "text", "item" or "fixed"
        for line in paragraph.split("\n"):
            stripped = line.strip()
            if not stripped:
                continue
            if ITEM.match(line):
                lines.append([line.rstrip(), "item"])
            elif line[:1].isspace():
                if lines and lines[-1][1] == "item":
                    lines[-1][0] += " " + stripped
                else:
                    lines.append([line.rstrip(), "fixed"])
            elif lines and lines[-1][1] != "fixed":
                lines[-1][0] += " " + stripped
            else:
                lines.append([stripped, "text"])
        paragraphs.append("\n".join(text for text, _ in lines))
    return "\n\n".join(paragraphs)


def reflow_commands(command: Any) -> None:
    """Reflow the help of `command` (a click command or group) and of all its subcommands."""
    if getattr(command, "_undo_reflowed", False):
        return
    command.help = reflow(command.help)
    command._undo_reflowed = True
    for sub in getattr(command, "commands", {}).values():
        reflow_commands(sub)
