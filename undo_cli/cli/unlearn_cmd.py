"""`undo unlearn`: the Unlearn step of UNDO (MaxEnt, GradDiff, GA, NPO, RMU; RepNoise, SAM)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import info, lazy_help
from undo_cli.cli.options import with_options
from undo_cli.cli.progress import run_stage
from undo_cli.options import (
    DataOptions,
    EvalOptions,
    LoadOptions,
    OutputOptions,
    SaveOptions,
    TrainConfig,
    UnlearnOptions,
)
from undo_cli.options.defaults import UNLEARN
from undo_cli.options.inputs import UnlearnInputs

_SUMMARY = ("Suppress a capability: train IN to forget the --forget data while keeping the "
            "--retain data, and write the result to OUT (the Unlearn step of UNDO, "
            "arXiv 2506.06278).")

# The help lists the registered methods, which live in `undo_cli.unlearn` (torch): it is
# built only when `undo unlearn --help` is shown (`lazy_help`), not for `undo --help`.


def _help() -> str:
    from undo_cli.options.defaults import RMU_STEPS, UNLEARN_STEPS, rate_text
    from undo_cli.options.rates import (
        RMU_TINY_LR,
        TINY_MODEL_PARAMS,
        UNLEARN_LR,
        UNLEARN_TINY_LR,
    )
    from undo_cli.unlearn import METHODS

    # One paragraph per method (typer keeps paragraphs apart, not single lines).
    lines = "\n\n".join(f"  {m.name}: L = {m.formula}" for m in METHODS.values())
    return (
        f"{_SUMMARY}"
        "\n\n"
        "Methods (a = --retain-weight, b = --beta, c = --steering-coeff, u a random unit "
        "vector seeded by --seed, h_L the output of decoder layer --layer, p_ref and h^frozen "
        "the frozen input model; CE and KL are means over target tokens):"
        "\n\n"
        f"{lines}"
        "\n\n"
        "Modifiers for every method: --repnoise (RepNoise: + beta * MMD(forget activations, "
        "Gaussian noise) - alpha * log(1 + CE(forget))) and --sam RHO (sharpness-aware "
        "minimisation: the gradient is taken at the weights moved by RHO along the gradient)."
        "\n\n"
        "Defaults follow the papers: retain weight 1 (RMU 1200), NPO beta 0.1, RMU c 6.5 at "
        "layer min(7, layers/2 - 1) training the MLP down-projections of layers L-2..L, "
        f"RepNoise alpha 1 and beta 0.001, a constant learning rate for {UNLEARN_STEPS} steps "
        f"(RMU {RMU_STEPS}). --lr defaults to {rate_text(UNLEARN_LR)} for models of "
        f"{TINY_MODEL_PARAMS // 1_000_000}M+ parameters and to {rate_text(UNLEARN_TINY_LR)} "
        f"(RMU {rate_text(RMU_TINY_LR)}) for smaller, toy models."
        "\n\n"
        "OUT gets the model, its tokenizer, train_log.jsonl and undo.json; a failed or "
        "diverged run writes nothing (see --keep-last-finite)."
    )


def _method_help() -> str:
    from undo_cli.unlearn import METHODS

    return f"Unlearning method: {', '.join(METHODS)} (formulas above)."


@app.command("unlearn", cls=lazy_help(_help, options={"inputs__method": _method_help}),
             short_help=_SUMMARY)
@with_options("unlearn", inputs=UnlearnInputs, train=TrainConfig, data_options=DataOptions,
              evals=EvalOptions, method_options=UnlearnOptions, load=LoadOptions, save=SaveOptions,
              output=OutputOptions)
def unlearn_command(
    src: Path = typer.Argument(..., metavar="IN", help="Input checkpoint directory."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    *,
    inputs: UnlearnInputs,
    method_options: UnlearnOptions,
    train: TrainConfig = UNLEARN,
    data_options: DataOptions,
    evals: EvalOptions,
    load: LoadOptions,
    save: SaveOptions,
    output: OutputOptions,
) -> None:
    """`undo unlearn IN OUT --method NAME --forget F [--retain R]` (see the help text)."""
    from undo_cli.unlearn import get_method, unlearn_checkpoint

    method = inputs.method
    get_method(method)
    summary = run_stage(output, f"unlearn ({method})", lambda callbacks: unlearn_checkpoint(
        src, out, method, inputs.forget, inputs.retain, method_options, train,
        data_options=data_options, evals=evals, load=load, overwrite=output.overwrite,
        callbacks=callbacks, save=save))
    if summary is not None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items()
                          if k not in ("grad_norm", "tokens_per_s"))
        info(f"wrote {out}: {summary['method']}, {summary['steps']} steps at lr "
             f"{summary['lr']:g}, {summary['tokens']:,} tokens"
             + (f"; last {shown}" if shown else ""))
