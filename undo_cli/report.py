"""`undo report`: one table and three figures comparing attacked models.

Input: the results directories written by `undo relearn-attack` (each holds `results.json` and
an `undo.json` whose parent is the attacked checkpoint, with that checkpoint's whole manifest
chain). Output, in `--out`:

- `report.md`: per model, the retain metric and the forget metric before the attack, the
  worst-case forget metric after it, the compute spent to make the model relative to the
  oracle's, and the relative robustness
  `(P_model - P_unlearned) / (P_oracle - P_unlearned)`, P the worst-case forget metric after
  the attack (the paper's definition: 0 = as fragile as unlearning alone, 1 = as robust as
  data filtering); and the same ratio over the whole attack, with each model's AUC (the mean
  of its worst-case curve) in place of P. The final point of one attack is noisy at small
  scale (docs/benchmarks.md: 38-53% over three seeds of the demo, where the AUC ratio gave
  62-77%); the AUC ratio weighs every evaluation of the attack.
- `relearn_curves.png` (worst-case relearning curves of all models), `pareto.png` (relative
  compute against relative robustness) and `retain_vs_forget.png` (retain performance against
  relearned forget performance); `report.json` with the same numbers.

Compute of a model = the FLOPs recorded in its manifest chain (every stage's `compute.flops`),
minus the chain of the base model when the base is one of its ancestors: what it cost to make
this model from the shared base (unlearning + distillation for UNDO; the whole training for the
oracle, which does not descend from the base).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.jsontext import to_json
from undo_cli.records import check_attack_results, check_manifest, read_json_file

ROLES = ("base", "unlearned", "oracle")


@dataclass
class AttackedModel:
    """One results directory of `undo relearn-attack`, as the report sees it."""

    label: str
    path: Path
    results: dict[str, Any]
    manifest: dict[str, Any] | None
    ancestors: set[str] = field(default_factory=set)  # fingerprints in the chain
    chain_flops: float = 0.0
    compute: float | None = None  # FLOPs to make it from the base
    robustness: float | None = None
    robustness_auc: float | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.results.get("fingerprint")

    @property
    def forget_metric(self) -> str:
        return self.results["forget_metric"]

    @property
    def auc(self) -> float | None:
        return self.results.get("summary", {}).get("auc")

    @property
    def forget_before(self) -> float | None:
        return self.results.get("initial", {}).get(self.forget_metric)

    @property
    def forget_after(self) -> float | None:
        return self.results.get("summary", {}).get("final")


def _checkpoint_manifest(results_manifest: dict | None) -> dict | None:
    """The attacked checkpoint's own manifest, embedded as the results' parent."""
    if not results_manifest:
        return None
    for parent in results_manifest.get("parents", []):
        if parent.get("role") == "input":
            return parent.get("manifest")
    return None


def _chain(manifest: dict | None) -> tuple[float, set[str]]:
    """Total FLOPs of a manifest chain and the fingerprints of all its ancestors."""
    flops: list[float] = []
    prints: set[str] = set()
    # Stages reached along two paths (e.g. a teacher that is also the perturbed student's
    # parent) are embedded twice; count each distinct stage once by its content.
    unique: dict[str, dict] = {}

    def key(m: dict) -> str:
        stripped = {k: v for k, v in m.items() if k != "parents"}
        parents = [p.get("fingerprint") for p in m.get("parents", [])]
        return json.dumps([stripped, parents], sort_keys=True, default=str)

    stack = [manifest]  # walked without recursion: chains can be long
    while stack:
        m = stack.pop()
        if not m:
            continue
        unique.setdefault(key(m), m)
        for p in m.get("parents", []):
            if p.get("fingerprint"):
                prints.add(p["fingerprint"])
            stack.append(p.get("manifest"))
    for m in unique.values():
        flops.append(float((m.get("compute") or {}).get("flops") or 0.0))
    return sum(flops), prints


def load_attacked(spec: str) -> AttackedModel:
    """`LABEL=RESULTS_DIR` or `RESULTS_DIR` (labelled by its directory name)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = Path(spec).name, spec
    directory = Path(path)
    file = directory / "results.json"
    if not file.is_file():
        raise UsageError(f"{directory} holds no results.json (expected a results directory of "
                         "`undo relearn-attack`)")
    results = check_attack_results(read_json_file(file), file)
    manifest_file = directory / "undo.json"
    manifest = None
    if manifest_file.is_file():
        manifest = check_manifest(read_json_file(manifest_file), manifest_file)
    model = AttackedModel(label=label, path=directory, results=results, manifest=manifest)
    model.chain_flops, model.ancestors = _chain(_checkpoint_manifest(manifest))
    return model


def relative_robustness(p_model: float, p_unlearned: float, p_oracle: float) -> float | None:
    """(P_model - P_unlearned) / (P_oracle - P_unlearned); None when the denominator is 0."""
    span = p_oracle - p_unlearned
    if span == 0:
        return None
    return (p_model - p_unlearned) / span


def build_report(specs: list[str], *, roles: dict[str, str] | None = None,
                 retain_metric: str | None = None) -> dict[str, Any]:
    """Numbers of the report (also written as report.json)."""
    models = [load_attacked(s) for s in specs]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"model labels must be unique (got {labels}); use LABEL=RESULTS_DIR")
    metrics = {m.forget_metric for m in models}
    if len(metrics) != 1:
        raise UsageError(f"the results use different forget metrics {sorted(metrics)}")
    forget_metric = metrics.pop()
    roles = dict(roles or {})
    for role in ROLES:
        roles.setdefault(role, role if role in labels else "")
        if roles[role] and roles[role] not in labels:
            raise UsageError(f"--{role} {roles[role]!r} is not one of the labels {labels}")
    by_label = {m.label: m for m in models}
    base = by_label.get(roles["base"])
    for m in models:
        m.compute = m.chain_flops
        if base is not None and m is not base and base.fingerprint in m.ancestors:
            m.compute = m.chain_flops - base.chain_flops
        elif m is base:
            m.compute = 0.0
    oracle, unlearned = by_label.get(roles["oracle"]), by_label.get(roles["unlearned"])
    if oracle and unlearned and oracle.forget_after is not None \
            and unlearned.forget_after is not None:
        for m in models:
            if m.forget_after is not None:
                m.robustness = relative_robustness(m.forget_after, unlearned.forget_after,
                                                   oracle.forget_after)
    if oracle and unlearned and oracle.auc is not None and unlearned.auc is not None:
        for m in models:
            if m.auc is not None:
                m.robustness_auc = relative_robustness(m.auc, unlearned.auc, oracle.auc)
    if retain_metric is None:
        set_name = forget_metric.split(".")[0]
        kind = forget_metric.split(".", 1)[1]
        candidates = [k for k in models[0].results.get("initial", {})
                      if k.endswith("." + kind) and not k.startswith(set_name + ".")]
        retain_metric = candidates[0] if candidates else None
    oracle_compute = oracle.compute if oracle and oracle.compute else None
    rows = []
    for m in models:
        initial = m.results.get("initial", {})
        rows.append({
            "model": m.label, "results": str(m.path),
            "retain": initial.get(retain_metric) if retain_metric else None,
            "forget_before": m.forget_before, "forget_after": m.forget_after,
            "auc": m.auc,
            "compute_flops": m.compute,
            "relative_compute": (m.compute / oracle_compute) if oracle_compute else None,
            "relative_robustness": m.robustness,
            "relative_robustness_auc": m.robustness_auc,
        })
    return {"forget_metric": forget_metric, "retain_metric": retain_metric, "roles": roles,
            "direction": models[0].results.get("direction"), "rows": rows,
            "curves": {m.label: m.results["worst_case"] for m in models}}


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: the table and the figures, readable on its own."""
    fm, rm = report["forget_metric"], report["retain_metric"] or "retain"
    lines = [
        "# UNDO report", "",
        f"Forget metric: `{fm}` (worst case over the attack's learning rates); retain metric: "
        f"`{rm}`. Relative robustness = (P_model - P_unlearned) / (P_oracle - P_unlearned) "
        "with P the forget metric after the attack; the AUC column puts each model's mean over "
        "its whole worst-case curve in place of P (steadier than one final point); compute "
        "relative to the oracle's.", "",
        f"| model | {rm} | {fm} before attack | {fm} after attack | relative compute | "
        "relative robustness | relative robustness (AUC) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {_fmt(r['retain'])} | {_fmt(r['forget_before'])} | "
                     f"{_fmt(r['forget_after'])} | {_fmt(r['relative_compute'], pct=True)} | "
                     f"{_fmt(r['relative_robustness'], pct=True)} | "
                     f"{_fmt(r['relative_robustness_auc'], pct=True)} |")
    lines += ["", "![worst-case relearning curves](relearn_curves.png)", "",
              "![compute against robustness](pareto.png)", "",
              "![retain against relearned forget performance](retain_vs_forget.png)", ""]
    return "\n".join(lines)


def write_report(specs: list[str], out: str | Path, *, roles: dict[str, str] | None = None,
                 retain_metric: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Build the report and write `report.md`, `report.json` and the figures into `out`."""
    from undo_cli.checkpoint import atomic_output, build_manifest, write_manifest

    report = build_report(specs, roles=roles, retain_metric=retain_metric)
    # REPORT_DIR may not lie inside, or (with --overwrite) replace, a results directory.
    inputs = [Path(row["results"]) for row in report["rows"]]
    with atomic_output(out, inputs=inputs, overwrite=overwrite) as tmp:
        (tmp / "report.md").write_text(render_markdown(report))
        (tmp / "report.json").write_text(to_json(report, indent=2) + "\n")
        figures = write_figures(report, tmp)
        write_manifest(tmp, build_manifest("report", arguments={"results": specs,
                                                                 "roles": report["roles"]}))
    report["figures"] = figures
    return report


def write_figures(report: dict[str, Any], directory: Path) -> list[str]:
    """The three PNG figures (an empty list, with a note, when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).info(
            "note: matplotlib is not installed, so the report has no figures "
            "(pip install 'undo-cli[plot]')")
        return []
    fm = report["forget_metric"]
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in report["curves"].items():
        ax.plot([p["step"] for p in curve], [p["value"] for p in curve], marker="o",
                markersize=3, label=label)
    ax.set_xlabel("relearning steps")
    ax.set_ylabel(f"{fm} (worst case over learning rates)")
    ax.set_title("Relearning attack: worst case for the defender")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "relearn_curves.png", dpi=120)
    plt.close(fig)
    written.append("relearn_curves.png")

    def scatter(name: str, xkey: str, ykey: str, xlabel: str, ylabel: str, title: str,
                pct: bool) -> None:
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        points = [(r[xkey], r[ykey], r["model"]) for r in report["rows"]
                  if r[xkey] is not None and r[ykey] is not None]
        for x, y, label in points:
            scale = 100 if pct else 1
            ax.scatter(x * scale, y * scale, s=40)
            ax.annotate(label, (x * scale, y * scale), textcoords="offset points",
                        xytext=(5, 5))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "needs --oracle and --unlearned results", ha="center",
                    transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        written.append(name)

    scatter("pareto.png", "relative_compute", "relative_robustness",
            "compute relative to the oracle (%)", "relative robustness (%)",
            "Compute against robustness", pct=True)
    scatter("retain_vs_forget.png", "forget_after", "retain",
            f"{fm} after the attack", report["retain_metric"] or "retain",
            "Retain performance against relearned forget performance", pct=False)
    return written
