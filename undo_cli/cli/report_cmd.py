"""`undo report`: a table and figures comparing models after relearning attacks."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, err_console, info
from undo_cli.stats import BOOTSTRAP_SAMPLES


@app.command("report")
def report_command(
    results: list[str] = typer.Argument(
        ..., metavar="[LABEL=]RESULTS_DIR...",
        help="Results directories of `undo relearn-attack`, optionally labelled (default "
        "label: the directory name). Several directories under one label (repeat the label, "
        "or give a quoted glob: 'undo=attacks/undo-s*') are pooled as seeds of that model."),
    out: Path = typer.Option(..., "--out", metavar="REPORT_DIR",
                             help="Where report.md, report.json and the PNG figures go."),
    oracle: str = typer.Option("oracle", help="Label of the data-filtering oracle (gold "
                               "standard of robustness)."),
    unlearned: str = typer.Option("unlearned", help="Label of the unlearned-only model "
                                  "(robustness 0)."),
    base: str = typer.Option("base", help="Label of the base model whose training compute "
                             "the others share (its chain is not counted as their compute)."),
    retain_metric: str = typer.Option(
        None, metavar="SET.METRIC",
        help="Retain metric of the table (default: the forget metric's kind on another set)."),
    bootstrap_samples: int = typer.Option(
        BOOTSTRAP_SAMPLES, "--bootstrap-samples", min=100,
        help="Resamples of the 95% intervals (seeds, and items within seeds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap (the same seed gives "
                             "the same intervals)."),
    max_retain_drop: float = typer.Option(
        0.1, "--max-retain-drop", metavar="D", min=0,
        help="The attack matrix's utility limit: an evaluation whose retain metric is more "
        "than D worse than the model's own before the attack does not count (verdicts are "
        "shown with and without it)."),
    fail_if: list[str] = typer.Option(
        None, "--fail-if", metavar="EXPR",
        help="Exit 3 (after writing) when EXPR holds, on any cell of the attack matrix: "
        "matrix.FAMILY.MODEL.worst, .difference, .collapsed, .verdict == \"recovered\" "
        "(or teaches, level, below oracle), .verdict_no_limit == ..."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty REPORT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
) -> None:
    """Compare attacked models: relative robustness with 95% intervals, compute, curves.

    Relative robustness = (P_model - P_unlearned) / (P_oracle - P_unlearned), P the worst-case
    forget metric after the attack (and, in the AUC column, its mean over the whole attack).
    Seeds of one label are pooled (means); the intervals resample the seeds and the evaluation
    items (2.5-97.5 percentiles), and the report says whether each model is significantly
    more robust than the unlearned one and below, level with or above the oracle. Labels that
    are not given (or not present) leave the corresponding columns empty.
    """
    from rich.table import Table

    from undo_cli.options import check_number, check_seed
    from undo_cli.report import parse_specs, with_interval, write_report

    check_number("--bootstrap-samples", bootstrap_samples, maximum=10**7)
    check_seed("--seed", seed)
    labels = list(parse_specs(results))
    roles = {"oracle": oracle if oracle in labels else "",
             "unlearned": unlearned if unlearned in labels else "",
             "base": base if base in labels else ""}
    check_number("--max-retain-drop", max_retain_drop, minimum=0)
    report = write_report(results, out, roles=roles, retain_metric=retain_metric,
                          overwrite=overwrite, samples=bootstrap_samples, seed=seed,
                          max_retain_drop=max_retain_drop, fail_if=fail_if or [])
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"undo report: {report['forget_metric']} (95% intervals)")
    for column in ("model", "seeds", report["retain_metric"] or "retain", "forget before",
                   "forget after", "rel. compute", "rel. robustness", "rel. robustness (AUC)"):
        table.add_column(column)
    for r in report["rows"]:
        table.add_row(r["model"], str(r["seeds"]), with_interval(r, "retain"),
                      with_interval(r, "forget_before"), with_interval(r, "forget_after"),
                      with_interval(r, "relative_compute", pct=True),
                      with_interval(r, "relative_robustness", pct=True),
                      with_interval(r, "relative_robustness_auc", pct=True))
    err_console.print(table)
    info(f"wrote {out / 'report.md'}")
