"""Figures of relearning attacks (matplotlib, an optional extra: `pip install 'undo-cli[plot]'`).

Every function takes results as `undo_cli.relearn` writes them (results.json, schema in that
module's docstring) and writes a PNG; matplotlib is imported only when a figure is drawn,
through its object API (no global pyplot state, no display needed). Used by
`undo relearn-attack` (relearn.png, and `--compare`) and meant for `undo report`.
"""

from __future__ import annotations

import importlib.util
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


def plot_attack(results: dict[str, Any], path: str | Path) -> Path:
    """The attack on one model: every run's forget-metric curve (colour = learning rate),
    quantised runs as crosses, the worst case in black, the threshold dotted."""
    from matplotlib import colormaps

    fig, ax = _figure()
    metric = results["forget_metric"]
    runs = results["runs"]
    lrs = sorted({r["lr"] for r in runs if r.get("lr") is not None})
    cmap = colormaps["viridis"]
    colour = {lr: cmap(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    labelled: set[Any] = set()
    for run in runs:
        xs, ys = _series(run.get("curve", []), metric)
        if not xs:
            continue
        c = colour.get(run.get("lr"), "tab:red")
        quantized = bool(run.get("quantize"))
        key = (run.get("lr"), quantized)
        label = None
        if key not in labelled:
            labelled.add(key)
            lr = "original" if run.get("lr") is None else f"lr {run['lr']:g}"
            label = f"{lr}, {run['quantize']['bits']}-bit" if quantized else lr
        if quantized:
            ax.plot(xs, ys, linestyle="none", marker="x", markersize=7, color=c, label=label)
        else:
            ax.plot(xs, ys, linewidth=1.0, alpha=0.7, color=c, label=label)
            if run.get("diverged") and xs:
                ax.plot(xs[-1:], ys[-1:], marker="v", color=c, markersize=5)
    xs, ys = _series([{"step": e["step"], "v": e["value"]} for e in results["worst_case"]], "v")
    ax.plot(xs, ys, color="black", linewidth=2.2, label="worst case")
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


def plot_compare(results: Sequence[dict[str, Any]], labels: Sequence[str],
                 path: str | Path) -> Path:
    """The worst-case curves of several attacked models (e.g. base, unlearned, UNDO,
    oracle) in one figure."""
    fig, ax = _figure()
    metric = results[0]["forget_metric"]
    for result, label in zip(results, labels):
        xs, ys = _series([{"step": e["step"], "v": e["value"]} for e in result["worst_case"]],
                         "v")
        ax.plot(xs, ys, linewidth=1.8, marker="o", markersize=2.5, label=label)
    return _finish(fig, ax, metric, f"relearning attacks: worst-case {metric}", path)


def plot_probes(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Probe accuracy per layer, one line per checkpoint and one panel per data set, with each
    set's majority-class baseline dashed (`undo probe`)."""
    import matplotlib.pyplot as plt

    names = list(results[0]["probes"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["INSTALL_HINT", "matplotlib_available", "plot_attack", "plot_compare",
           "plot_probes", "require_matplotlib"]
