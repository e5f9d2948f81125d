"""`undo report`: a table and figures comparing models after relearning attacks."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, err_console, info


@app.command("report")
def report_command(
    results: list[str] = typer.Argument(
        ..., metavar="[LABEL=]RESULTS_DIR...",
        help="Results directories of `undo relearn-attack`, optionally labelled "
        "(default label: the directory name)."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty REPORT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
) -> None:
    """Compare attacked models: relative robustness and compute, relearning curves, Pareto plot.

    Relative robustness = (P_model - P_unlearned) / (P_oracle - P_unlearned), P the worst-case
    forget metric after the attack. Labels that are not given (or not present) leave the
    corresponding columns empty.
    """
    from rich.table import Table

    from undo_cli.report import write_report

    roles = {"oracle": oracle if oracle in _labels(results) else "",
             "unlearned": unlearned if unlearned in _labels(results) else "",
             "base": base if base in _labels(results) else ""}
    report = write_report(results, out, roles=roles, retain_metric=retain_metric,
                          overwrite=overwrite)
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"undo report: {report['forget_metric']}")
    for column in ("model", report["retain_metric"] or "retain", "forget before",
                   "forget after", "rel. compute", "rel. robustness"):
        table.add_column(column)
    for r in report["rows"]:
        table.add_row(r["model"], *(_cell(r[k]) for k in ("retain", "forget_before",
                                                          "forget_after")),
                      _cell(r["relative_compute"], pct=True),
                      _cell(r["relative_robustness"], pct=True))
    err_console.print(table)
    info(f"wrote {out / 'report.md'}")


def _labels(specs: list[str]) -> list[str]:
    return [s.partition("=")[0] if "=" in s else Path(s).name for s in specs]


def _cell(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if pct else f"{value:.3g}"
