"""`undo perturb`: the Noise step of UNDO, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.console import ProgressDisplay
from undo_cli.options import LoadOptions, NoiseOptions, OutputOptions, SaveOptions
from undo_cli.options.commands import PerturbRunOptions

PERTURB_HELP = (
    "Shrink every weight and add Xavier noise: the Noise step of UNDO (arXiv 2506.06278)."
    "\n\n"
    "Every weight with 2+ dimensions (embeddings included) becomes "
    "(1 - alpha) * w + alpha * beta * N, with N Xavier noise for its fan-in and fan-out; "
    "1-D tensors (norms, biases) are only shrunk to (1 - alpha) * w; non-float tensors are "
    "copied unchanged."
    "\n\n"
    "The paper's recommended setting is --alpha 0.6 --beta 0.1 (the defaults); its WMDP "
    "setting is --alpha 0.25 --beta 0 (pure shrinking). --layers 10-15 (or --include / "
    "--exclude REGEX) limits the noise to some tensors; the others are copied unchanged."
    "\n\n"
    "Tensors are streamed one at a time, so memory stays near one tensor, not the model. "
    "dtype, sharding and tied weights are kept; the same seed gives byte-identical files."
    "\n\n"
    "A PEFT adapter as IN is merged into its base model in memory first (the base's dtype "
    "and sharding are kept): the result equals perturbing the merged checkpoint."
)


@app.command("perturb", help=PERTURB_HELP)
@with_options("perturb", settings=NoiseOptions, run=PerturbRunOptions, save=SaveOptions,
              load=LoadOptions, output=OutputOptions,
              exclude=("save_dtype", "allow_pickle", "trust_remote_code"))
def perturb_command(
    src: Path = typer.Argument(..., metavar="IN", help="Input checkpoint directory "
                               "(safetensors, single file or sharded), or a PEFT adapter: "
                               "merged into its base (--base-model) in memory, then noised."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    *,
    settings: NoiseOptions,
    run: PerturbRunOptions,
    save: SaveOptions,
    load: LoadOptions,
    output: OutputOptions,
) -> None:
    """`undo perturb IN OUT --alpha A --beta B` (see PERTURB_HELP)."""
    import os

    # numpy's OpenBLAS would start a spinning thread per core; perturb uses no BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from undo_cli.perturb import perturb_checkpoint

    display = ProgressDisplay(show_output(output.quiet), transient=True, bytes_=True)

    def progress(done: int, total: int) -> None:
        if not display.live:  # only once the checks passed and writing began
            display.start(total, "perturb")
        display.update(done, total=total)

    try:
        summary = perturb_checkpoint(
            src, out, settings, seed=run.seed, save=save, overwrite=output.overwrite,
            allow_nonfinite=run.allow_nonfinite, progress=progress, base_model=load.base_model)
    finally:
        display.close()
    if output.json:
        emit_json(summary)
    elif not output.quiet:
        info(f"wrote {out}: {summary['noised']} tensors noised, {summary['shrunk']} shrunk, "
             f"{summary['copied']} copied (alpha {summary['alpha']}, beta {summary['beta']}, "
             f"{summary['noise']}, seed {summary['seed']})")
