"""`undo init`: a randomly initialised checkpoint with a locally built tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.options import OutputOptions, SaveOptions
from undo_cli.options.commands import InitOptions


@app.command("init")
@with_options("init", init=InitOptions, save=SaveOptions, output=OutputOptions)
def init_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    *,
    init: InitOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """Write a randomly initialised model + tokenizer (for tests, examples, random students)."""
    from undo_cli.modelfactory import init_checkpoint

    show_output(output.quiet)
    summary = init_checkpoint(out, init, save=save, overwrite=output.overwrite)
    if output.json:
        emit_json(summary)
    else:
        info(f"wrote {out}: {summary['arch']}, {summary['parameters']:,} parameters, "
             f"vocabulary {summary['vocab_size']}")
