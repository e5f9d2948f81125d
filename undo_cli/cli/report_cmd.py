"""`undo report`: a table and figures comparing models after relearning attacks."""

from __future__ import annotations

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, err_console, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.options import OutputOptions
from undo_cli.options.commands import ReportOptions
from undo_cli.options.inputs import ReportOutput
from undo_cli.options.paths import named_paths


@app.command("report")
@with_options("report", reads={"results": named_paths}, where=ReportOutput,
              report=ReportOptions, output=OutputOptions)
def report_command(
    results: list[str] = typer.Argument(
        ..., metavar="[LABEL=]RESULTS_DIR...",
        help="Results directories of `undo relearn-attack`, optionally labelled (default "
        "label: the directory name). Several directories under one label (repeat the label, "
        "or give a quoted glob: 'undo=attacks/undo-s*') are pooled as seeds of that model."),
    *,
    where: ReportOutput,
    report: ReportOptions,
    output: OutputOptions,
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

    from undo_cli.report import parse_specs, with_interval, write_report

    talk = show_output(output.quiet)
    out = where.out
    labels = list(parse_specs(results))
    roles = {role: label if label in labels else "" for role, label in
             (("oracle", report.oracle), ("unlearned", report.unlearned), ("base", report.base))}
    summary = write_report(results, out, roles=roles, retain_metric=report.retain_metric,
                           overwrite=output.overwrite, samples=report.bootstrap_samples,
                           seed=report.seed, max_retain_drop=report.max_retain_drop,
                           fail_if=report.fail_if)
    if output.json:
        emit_json(summary)
        return
    if not talk:
        return
    table = Table(title=f"undo report: {summary['forget_metric']} (95% intervals)")
    for column in ("model", "seeds", summary["retain_metric"] or "retain", "forget before",
                   "forget after", "rel. compute", "rel. robustness", "rel. robustness (AUC)"):
        table.add_column(column)
    for r in summary["rows"]:
        table.add_row(r["model"], str(r["seeds"]), with_interval(r, "retain"),
                      with_interval(r, "forget_before"), with_interval(r, "forget_after"),
                      with_interval(r, "relative_compute", pct=True),
                      with_interval(r, "relative_robustness", pct=True),
                      with_interval(r, "relative_robustness_auc", pct=True))
    err_console.print(table)
    info(f"wrote {out / 'report.md'}")
