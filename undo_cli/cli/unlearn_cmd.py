"""`undo unlearn`: the Unlearn step of UNDO (MaxEnt, GradDiff, GA, NPO, RMU; RepNoise, SAM)."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import (
    TrainingOptions,
    emit_json,
    info,
    lazy_help,
    training_options,
)

_METHOD = "Method"
_SUMMARY = ("Suppress a capability: train IN to forget the --forget data while keeping the "
            "--retain data, and write the result to OUT (the Unlearn step of UNDO, "
            "arXiv 2506.06278).")

# The help lists the registered methods, which live in `undo_cli.unlearn` (torch): it is
# built only when `undo unlearn --help` is shown (`lazy_help`), not for `undo --help`.


def _help() -> str:
    from undo_cli.unlearn import METHODS, TINY_MODEL_PARAMS

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
        "RepNoise alpha 1 and beta 0.001, a constant learning rate for 100 steps (RMU 500). "
        f"--lr defaults to 5e-5 for models of {TINY_MODEL_PARAMS // 1_000_000}M+ parameters and "
        "to 1e-3 (RMU 1e-2) for smaller, toy models."
        "\n\n"
        "OUT gets the model, its tokenizer, train_log.jsonl and undo.json; a failed or "
        "diverged run writes nothing (see --keep-last-finite)."
    )


def _method_help() -> str:
    from undo_cli.unlearn import METHODS

    return f"Unlearning method: {', '.join(METHODS)} (formulas above)."


@app.command("unlearn", cls=lazy_help(_help, options={"method": _method_help}),
             short_help=_SUMMARY)
@training_options(
    defaults={"lr": None, "schedule": "constant"},
    help={"lr": "Peak learning rate (AdamW). Default: 5e-5 for models of 10M+ parameters "
                "(the paper sweeps 1e-5..8e-5), 1e-3 below (RMU: 1e-2).",
          "max_steps": "Stop after this many optimizer steps. Default: 100 (RMU: 500) unless "
                       "--max-tokens is given.",
          "schedule": "Learning-rate schedule after warmup: constant (the paper's), linear or "
                      "cosine.",
          "batch_size": "Examples per micro-batch, per data stream (forget and retain) and "
                        "per process."},
)
def unlearn_command(
    src: Path = typer.Argument(..., metavar="IN", help="Input checkpoint directory."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    method: str = typer.Option(
        ..., "--method", metavar="NAME", rich_help_panel=_METHOD,
        help="Unlearning method (formulas above)."),  # the full help: _method_help
    forget: list[str] = typer.Option(
        ..., "--forget", metavar="PATH[:WEIGHT]", rich_help_panel=_METHOD,
        help="Data to forget, repeatable with mixing weights ({\"text\"} records are packed "
        "into --max-length blocks; {\"prompt\", \"completion\"} records count the completion "
        "only)."),
    retain: list[str] = typer.Option(
        [], "--retain", metavar="PATH[:WEIGHT]", rich_help_panel=_METHOD,
        help="Data to keep, repeatable (not used by ga; without it no retain term)."),
    retain_weight: float = typer.Option(
        None, "--retain-weight", metavar="A", rich_help_panel=_METHOD,
        help="Weight a of the retain term. Default: 1 (rmu: 1200, as in the WMDP paper)."),
    beta: float = typer.Option(
        0.1, "--beta", metavar="B", rich_help_panel=_METHOD,
        help="npo: inverse temperature b (> 0; the NPO paper's 0.1). Small b behaves like "
        "gradient ascent."),
    layer: int = typer.Option(
        None, "--layer", metavar="L", rich_help_panel=_METHOD,
        help="rmu: decoder layer (0-based) whose output is steered. Default: min(7, "
        "layers/2 - 1): 7 as in the WMDP paper on deep models, 0 on a 2-layer model."),
    steering_coeff: float = typer.Option(
        6.5, "--steering-coeff", metavar="C", rich_help_panel=_METHOD,
        help="rmu: norm c of the target c * u of forget activations (WMDP paper: 6.5)."),
    trainable: str = typer.Option(
        None, "--trainable", metavar="REGEX", rich_help_panel=_METHOD,
        help="Train only parameters whose name matches (re.search). Default: all; rmu: the "
        "MLP down-projections of layers L-2..L."),
    repnoise: bool = typer.Option(
        False, "--repnoise", rich_help_panel=_METHOD,
        help="Add RepNoise: pull forget activations (every layer) toward Gaussian noise "
        "(MMD) and ascend the forget loss."),
    repnoise_alpha: float = typer.Option(
        1.0, "--repnoise-alpha", rich_help_panel=_METHOD,
        help="RepNoise weight of the ascent term -log(1 + CE(forget))."),
    repnoise_beta: float = typer.Option(
        1e-3, "--repnoise-beta", rich_help_panel=_METHOD,
        help="RepNoise weight of the noise (MMD) term."),
    sam: float = typer.Option(
        0.0, "--sam", metavar="RHO", rich_help_panel=_METHOD,
        help="Sharpness-aware minimisation with radius RHO (e.g. 0.05; 0: off). Doubles the "
        "compute of a step."),
    eval_sets: list[str] = typer.Option(
        [], "--eval", metavar="NAME=PATH",
        help="Held-out data evaluated every --eval-every steps and at the end (metrics "
        "NAME.loss, NAME.accuracy, ...; repeatable)."),
    *,
    opts: TrainingOptions,
) -> None:
    """`undo unlearn IN OUT --method NAME --forget F [--retain R]` (see the help text)."""
    from undo_cli.engine import is_main_process
    from undo_cli.errors import UsageError
    from undo_cli.records import parse_named_spec
    from undo_cli.unlearn import UnlearnOptions, get_method, unlearn_checkpoint

    get_method(method)
    if not sam >= 0:
        raise UsageError("--sam must not be negative")
    options = UnlearnOptions(
        retain_weight=retain_weight, beta=beta, layer=layer, steering_coeff=steering_coeff,
        trainable=trainable, repnoise=repnoise, repnoise_alpha=repnoise_alpha,
        repnoise_beta=repnoise_beta, seed=opts.seed)
    named_evals = [parse_named_spec(spec, "--eval") for spec in eval_sets]
    config = opts.train_config(out, sam_rho=sam)
    summary = unlearn_checkpoint(
        src, out, method, forget, retain, options, config, max_length=opts.max_length,
        eval_specs=named_evals, overwrite=opts.overwrite, allow_pickle=opts.allow_pickle,
        trust_remote_code=opts.trust_remote_code)
    if not is_main_process():
        return
    if opts.json:
        emit_json(summary)
        return
    final = summary["final"]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items()
                      if k not in ("grad_norm", "tokens_per_s"))
    info(f"wrote {out}: {summary['method']}, {summary['steps']} steps at lr {summary['lr']:g}, "
         f"{summary['tokens']:,} tokens" + (f"; last {shown}" if shown else ""))
    if summary["diverged"]:
        info(f"warning: {summary['stop_reason']}; wrote the last finite weights")
