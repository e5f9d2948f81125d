"""`undo plan CMD ARGS...`: the memory plan of a training command, before any work."""

from __future__ import annotations

import typer

from undo_cli.cli.app import app
from undo_cli.errors import UsageError

PLANNED = ("train", "unlearn", "distill", "relearn-attack")


@app.command("plan", context_settings={"allow_extra_args": True,
                                       "ignore_unknown_options": True,
                                       "help_option_names": ["--help"]})
def plan_command(ctx: typer.Context, command: str = typer.Argument(
        ..., metavar="CMD", help=f"The command to plan: {', '.join(PLANNED)}.")) -> None:
    """Print the memory plan of `undo CMD ARGS...` and stop (CMD's --dry-run): parameters,
    bytes of weights, gradients, optimizer state and activations per micro-batch under the
    options and processes given, and whether it fits the device. Nothing is written."""
    if command not in PLANNED:
        raise UsageError(f"undo plan {command}: plans exist for {', '.join(PLANNED)}")
    group = ctx.parent.command
    sub = group.get_command(ctx.parent, command)
    args = [a for a in ctx.args if a != "--dry-run"] + ["--dry-run"]
    with sub.make_context(command, args, parent=ctx.parent) as sub_ctx:
        sub.invoke(sub_ctx)
