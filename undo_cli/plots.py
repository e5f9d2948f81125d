"""Figures of relearning attacks (matplotlib, an optional extra: `pip install 'undo-cli[plot]'`).

Every function takes results as `undo_cli.relearn` writes them (results.json, schema in that
module's docstring) and writes a PNG; matplotlib is imported only when a figure is drawn,
through its object API (no global pyplot state, no display needed). Used by
`undo relearn-attack` (relearn.png, and `--compare`), `undo probe` and `undo report`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError

INSTALL_HINT = "matplotlib is not installed: pip install 'undo-cli[plot]' (or matplotlib)"
DPI = 120


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """`UsageError` with the install command when matplotlib is missing."""
    if not matplotlib_available():
        raise UsageError(INSTALL_HINT)


def _figure(width: float = 7.0, height: float = 4.5):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _series(curve: Sequence[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for entry in curve:
        value = entry.get(metric)
        if isinstance(value, (int, float)) and value == value:
            xs.append(entry["step"])
            ys.append(value)
    return xs, ys


def _finish(fig, ax, metric: str, title: str, path: str | Path) -> Path:
    ax.set_xlabel("attack step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# tab10 without grey (the threshold's colour) and olive (a yellow lost on white)
RUN_COLOURS = (0, 1, 2, 3, 4, 5, 6, 9)


def plot_attack(results: dict[str, Any], path: str | Path) -> Path:
    """The attack on one model: every run's forget-metric curve (one colour per configuration,
    no yellow), quantised runs as crosses, static attacks as horizontal dotted lines (their
    value holds at every step), the worst case as a thin black dashed line over its 95% band,
    drawn beneath the runs so that the run it follows (often the largest learning rate's)
    stays visible, the threshold dotted."""
    from matplotlib import colormaps

    fig, ax = _figure()
    metric = results["forget_metric"]
    runs = results["runs"]
    names = list(dict.fromkeys(r.get("config") or _lr_name(r) for r in runs))
    if len(names) <= len(RUN_COLOURS):
        colour = {n: colormaps["tab10"](RUN_COLOURS[i]) for i, n in enumerate(names)}
    else:  # viridis without its yellow end, which the eye loses on white
        colour = {n: colormaps["viridis"](0.75 * i / (len(names) - 1))
                  for i, n in enumerate(names)}
    labelled: set[Any] = set()
    last_step = max((e["step"] for e in results["worst_case"]), default=0)
    for run in runs:
        xs, ys = _series(run.get("curve", []), metric)
        if not xs:
            continue
        name = run.get("config") or _lr_name(run)
        c = colour[name]
        quantized = bool(run.get("quantize"))
        label = None
        if (name, quantized) not in labelled and len(names) <= 12:
            labelled.add((name, quantized))
            label = f"{name}, {run['quantize']['bits']}-bit" if quantized else name
        if quantized:
            ax.plot(xs, ys, linestyle="none", marker="x", markersize=7, color=c, label=label)
        elif run.get("static"):
            ax.plot([0, max(last_step, 1)], [ys[0], ys[0]], linestyle=":", linewidth=1.2,
                    color=c, label=label)
        else:
            ax.plot(xs, ys, linewidth=1.0, alpha=0.7, color=c, label=label)
            if run.get("diverged") and xs:
                ax.plot(xs[-1:], ys[-1:], marker="v", color=c, markersize=5)
    worst = results["worst_case"]
    xs, ys = _series([{"step": e["step"], "v": e["value"]} for e in worst], "v")
    band = [(e["step"], e["lower"], e["upper"]) for e in worst
            if e.get("lower") is not None and e.get("upper") is not None]
    if band:
        bx, lo, hi = zip(*band)
        ax.fill_between(bx, lo, hi, color="black", alpha=0.12, linewidth=0,
                        label="worst case, 95% band")
    ax.plot(xs, ys, color="black", linewidth=1.2, linestyle=(0, (4, 3)), label="worst case",
            zorder=1.9)  # under the runs (zorder 2): it runs along one of them
    threshold = results.get("summary", {}).get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle=":", linewidth=1.2, label="threshold")
    attack = results.get("attack", {})
    name = Path(results["checkpoint"]).name if results.get("checkpoint") else "model"
    mode = attack.get("mode", "full")
    title = f"relearning attack on {name} ({mode}"
    if attack.get("quantize"):
        title += f", {attack['quantize']['bits']}-bit"
    title += f"): worst-case {metric}"
    return _finish(fig, ax, metric, title, path)


def _lr_name(run: dict[str, Any]) -> str:
    return "original" if run.get("lr") is None else f"lr {run['lr']:g}"


def plot_compare(results: Sequence[dict[str, Any]], labels: Sequence[str],
                 path: str | Path) -> Path:
    """The worst-case curves of several attacked models (e.g. base, unlearned, UNDO,
    oracle) in one figure."""
    fig, ax = _figure()
    metric = results[0]["forget_metric"]
    for result, label in zip(results, labels):
        worst = result["worst_case"]
        xs, ys = _series([{"step": e["step"], "v": e["value"]} for e in worst], "v")
        line = ax.plot(xs, ys, linewidth=1.8, marker="o", markersize=2.5, label=label)[0]
        band = [(e["step"], e["lower"], e["upper"]) for e in worst
                if e.get("lower") is not None and e.get("upper") is not None]
        if band:
            bx, lo, hi = zip(*band)
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    return _finish(fig, ax, metric, f"relearning attacks: worst-case {metric}", path)


def plot_probes(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Probe accuracy per layer, one line per checkpoint and one panel per data set, with each
    set's majority-class baseline dashed (`undo probe`)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results[0]["probes"])
    fig = Figure(figsize=(5.5 * len(names), 4.0), dpi=DPI)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for result in results:
            probe = result["probes"][name]
            ax.plot(probe["layers"], probe["accuracy"], marker="o", markersize=3,
                    label=Path(result["checkpoint"]).name)
        ax.axhline(results[0]["probes"][name]["baseline"], color="grey", linestyle="--",
                   linewidth=1, label="majority baseline")
        ax.set_xlabel("layer (-1: embeddings)")
        ax.set_ylabel("held-out probe accuracy")
        ax.set_title(f"linear probe: {name}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def model_colours(labels: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per label, in order of first appearance (tab10, then tab20)."""
    import matplotlib

    unique = list(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(unique)}


def _with_error(ax, x: float, y: float, low: float | None, high: float | None, *,
                colour: Any, hollow: bool, label: str | None = None) -> None:
    """A point at (x, y) with its vertical interval, filled or hollow."""
    yerr = [[y - low], [high - y]] if low is not None and high is not None else None
    ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, color=colour, label=label,
                markerfacecolor="white" if hollow else colour, markersize=7 if hollow else 6)


def plot_frontier(report: dict[str, Any], colours: dict[str, Any]):
    """Relative compute against relative robustness: per model the headline (the AUC, filled)
    and the final point (hollow), each with its 95% interval; with two or more models besides
    base, unlearned and oracle, their AUC frontier from the unlearned model to the oracle, and
    the straight line between those two for reference (a method above it buys robustness for
    less than its share of the oracle's compute)."""
    fig, ax = _figure(6.4, 4.6)
    roles = report.get("roles") or {}
    rows = [r for r in report["rows"] if r.get("relative_compute") is not None]
    frontier = []
    for r in rows:
        x = r["relative_compute"] * 100
        colour = colours[r["model"]]
        for key, hollow, dx in (("relative_robustness_auc", False, 0.0),
                                ("relative_robustness", True, 0.8)):
            y = r.get(key)
            if y is None:
                continue
            low, high = r.get(f"{key}_lower"), r.get(f"{key}_upper")
            _with_error(ax, x + dx, y * 100, None if low is None else low * 100,
                        None if high is None else high * 100, colour=colour, hollow=hollow,
                        label=r["model"] if not hollow else None)
        if r.get("relative_robustness_auc") is not None and r["model"] != roles.get("base"):
            frontier.append((x, r["relative_robustness_auc"] * 100, r["model"]))
    unlearned = next((r for r in rows if r["model"] == roles.get("unlearned")), None)
    oracle = next((r for r in rows if r["model"] == roles.get("oracle")), None)
    methods = [f for f in frontier
               if f[2] not in (roles.get("unlearned"), roles.get("oracle"))]
    if unlearned and oracle and len(methods) >= 2:
        ends = [(unlearned["relative_compute"] * 100, 0.0), (100.0, 100.0)]
        ax.plot(*zip(*ends), linestyle="--", color="grey", linewidth=1,
                label="unlearned to oracle, straight")
        points = sorted([ends[0], *[(x, y) for x, y, _ in methods], ends[1]])
        ax.plot(*zip(*points), color="black", linewidth=1, alpha=0.6,
                label="frontier (AUC)")
    ax.plot([], [], "o", color="black", label="AUC (headline)")
    ax.plot([], [], "o", color="black", markerfacecolor="white", label="final point")
    if not rows:
        ax.text(0.5, 0.5, "needs --oracle and --unlearned results", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("compute relative to the oracle (%)")
    ax.set_ylabel("relative robustness (%, 95% interval)")
    ax.set_title("Compute against robustness: AUC (filled) and final point (hollow)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_report(report: dict[str, Any], directory: Path) -> list[str]:
    """`undo report`'s three figures in `directory` (an empty list, with a note, without
    matplotlib): the pooled worst-case curves with their 95% bands, relative compute against
    relative robustness and retain against relearned forget performance, with intervals."""
    if not matplotlib_available():
        logging.getLogger(__name__).info(
            "note: matplotlib is not installed, so the report has no figures "
            "(pip install 'undo-cli[plot]')")
        return []
    fm = report["forget_metric"]
    colours = model_colours([r["model"] for r in report["rows"]] + list(report["curves"]))
    fig, ax = _figure(6.4, 4.2)
    for label, curve in report["curves"].items():
        ax.plot([p["step"] for p in curve], [p["value"] for p in curve], marker="o",
                markersize=3, label=label, color=colours[label])
        band = [(p["step"], p["lower"], p["upper"]) for p in curve
                if p.get("lower") is not None and p.get("upper") is not None]
        if band:
            steps, lows, highs = zip(*band)
            ax.fill_between(steps, lows, highs, color=colours[label], alpha=0.15,
                            linewidth=0)
    _finish(fig, ax, f"{fm} (worst case)",
            "Relearning attack: worst case for the defender (95% bands)",
            directory / "relearn_curves.png")
    written = ["relearn_curves.png"]
    fig = plot_frontier(report, colours)
    fig.savefig(directory / "pareto.png")
    written.append("pareto.png")

    def scatter(name: str, xkey: str, ykey: str, xlabel: str, ylabel: str, title: str,
                pct: bool) -> None:
        fig, ax = _figure(5.6, 4.2)
        scale = 100 if pct else 1
        rows = [r for r in report["rows"] if r[xkey] is not None and r[ykey] is not None]
        for r in rows:
            x, y = r[xkey] * scale, r[ykey] * scale
            low, high = r.get(f"{ykey}_lower"), r.get(f"{ykey}_upper")
            colour = colours[r["model"]]
            if low is not None and high is not None:
                ax.errorbar([x], [y], yerr=[[y - low * scale], [high * scale - y]], fmt="o",
                            capsize=3, color=colour)
            else:
                ax.scatter([x], [y], s=40, color=colour)
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 5))
        if not rows:
            ax.text(0.5, 0.5, "needs --oracle and --unlearned results", ha="center",
                    transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / name)
        written.append(name)

    scatter("retain_vs_forget.png", "forget_after", "retain",
            f"{fm} after the attack", report["retain_metric"] or "retain",
            "Retain performance against relearned forget performance", pct=False)
    return written


__all__ = ["INSTALL_HINT", "matplotlib_available", "model_colours", "plot_attack",
           "plot_compare", "plot_frontier", "plot_probes", "plot_report", "require_matplotlib"]


# --------------------------------------------------------------------- the attack matrix


def plot_matrix_figures(report: dict[str, Any], directory: Path) -> list[str]:
    """`matrix.png` (models x attack families, coloured by the worst-case forget metric and
    labelled with the oracle-controlled verdict) and `attacker_cost.png` (each model's worst
    case against the attacker's FLOPs, log axis); an empty list without matplotlib or
    without a matrix."""
    matrix = report.get("matrix")
    if not matplotlib_available() or not matrix or not matrix.get("families"):
        return []
    import numpy as np

    families, models = matrix["families"], matrix["models"]
    grid = np.full((len(models), len(families)), np.nan)
    fig, ax = _figure(1.6 + 1.4 * len(families), 1.2 + 0.6 * len(models))
    for i, model in enumerate(models):
        for j, fam in enumerate(families):
            cell = matrix["cells"][fam][model]
            if cell.get("attacked") and cell.get("worst") is not None:
                grid[i, j] = cell["worst"]
                text = f"{cell['worst']:.3g}\n{cell.get('verdict') or ''}"
                if cell.get("collapsed"):
                    text += "\ncollapsed"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0})
    image = ax.imshow(grid, cmap="viridis" if report.get("direction") == "max"
                      else "viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"{report['forget_metric']} (worst case)")
    ax.set_xticks(range(len(families)), families, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_title("Attack matrix: worst case and verdict vs the oracle", fontsize=10)
    fig.tight_layout()
    fig.savefig(directory / "matrix.png", dpi=DPI)
    written = ["matrix.png"]
    cost = report.get("attacker_cost") or {}
    curves = {m: c for m, c in cost.items() if c.get("flops")}
    if curves:
        fig, ax = _figure(6.4, 4.2)
        positive = [f for c in curves.values() for f in c["flops"] if f > 0]
        floor = min(positive) / 10 if positive else 1.0
        for model, c in curves.items():
            xs = [max(f, floor) for f in c["flops"]]
            line = ax.step(xs, c["value"], where="post", label=model)[0]
            if c.get("flops_to_target") is not None:
                ax.axvline(max(c["flops_to_target"], floor), color=line.get_color(),
                           linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("attacker FLOPs (one run; no-training attacks at the left edge)")
        ax.set_ylabel(f"{report['forget_metric']} (worst case)")
        ax.set_title("Worst case against attacker compute (dotted: half the base's "
                     "recovery)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / "attacker_cost.png", dpi=DPI)
        written.append("attacker_cost.png")
    return written
