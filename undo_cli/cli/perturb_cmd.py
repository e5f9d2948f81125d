"""`undo perturb`: the Noise step of UNDO, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, err_console, info

NOISE_HELP = "Noise distribution: xavier-uniform (the paper's) or xavier-normal."


PERTURB_HELP = (
    "Shrink every weight and add Xavier noise: the Noise step of UNDO (arXiv 2506.06278)."
    "\n\n"
    "Every weight with 2+ dimensions (embeddings included) becomes "
    "(1 - alpha) * w + alpha * beta * N, with N Xavier noise for its fan-in and fan-out; "
    "1-D tensors (norms, biases) are only shrunk to (1 - alpha) * w; non-float tensors are "
    "copied unchanged."
    "\n\n"
    "The paper's recommended setting is --alpha 0.6 --beta 0.1 (the defaults)."
    "\n\n"
    "Tensors are streamed one at a time, so memory stays near one tensor, not the model. "
    "dtype, sharding and tied weights are kept; the same seed gives byte-identical files."
)


@app.command("perturb", help=PERTURB_HELP)
def perturb_command(
    src: Path = typer.Argument(..., metavar="IN", help="Input checkpoint directory "
                               "(safetensors, single file or sharded)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    alpha: float = typer.Option(
        0.6, "--alpha", help="Fraction of each weight replaced by noise, in [0, 1]: "
        "out = (1 - alpha) * w + alpha * beta * N. 0 leaves the weights unchanged."),
    beta: float = typer.Option(
        0.1, "--beta", help="Scale of the Xavier noise N (>= 0). --alpha 1 --beta 1 is a "
        "fresh Xavier initialisation."),
    seed: int = typer.Option(0, "--seed", help="Noise seed; the same seed gives "
                             "byte-identical weights."),
    noise: str = typer.Option("xavier-uniform", "--noise", help=NOISE_HELP),
    include: list[str] = typer.Option(
        None, "--include", metavar="REGEX", help="Perturb only tensors whose name matches "
        "(repeatable; others are copied unchanged)."),
    exclude: list[str] = typer.Option(
        None, "--exclude", metavar="REGEX", help="Copy tensors whose name matches unchanged "
        "(repeatable)."),
    max_shard_size: str = typer.Option(
        None, "--max-shard-size", metavar="SIZE", help="Re-shard the output into files of at "
        "most SIZE (e.g. 2GB, 500MB); default: shard like the input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
) -> None:
    """`undo perturb IN OUT --alpha A --beta B` (see PERTURB_HELP)."""
    import os

    # numpy's OpenBLAS would start a spinning thread per core; perturb uses no BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from undo_cli.checkpoint.safetensors_io import parse_size
    from undo_cli.perturb import make_options, perturb_checkpoint

    # Check every argument before any work.
    make_options(alpha, beta, seed, noise, include or None, exclude or None)
    if max_shard_size is not None:
        parse_size(max_shard_size)

    def run(progress=None) -> dict:
        return perturb_checkpoint(
            src, out, alpha, beta, seed, noise, include=include or None,
            exclude=exclude or None, max_shard_size=max_shard_size, overwrite=overwrite,
            progress=progress)

    if quiet or not err_console.is_terminal:
        summary = run()
    else:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(TextColumn("perturb"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                       transient=True)
        task = bar.add_task("perturb", total=None)

        def progress(done: int, total: int) -> None:
            if not bar.live.is_started:  # only once the checks passed and writing began
                bar.start()
            bar.update(task, completed=done, total=total)

        try:
            summary = run(progress)
        finally:
            bar.stop()
    if json_out:
        emit_json(summary)
    elif not quiet:
        info(f"wrote {out}: {summary['noised']} tensors noised, {summary['shrunk']} shrunk, "
             f"{summary['copied']} copied (alpha {summary['alpha']}, beta {summary['beta']}, "
             f"{summary['noise']}, seed {summary['seed']})")
