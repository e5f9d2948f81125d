"""`undo report`: one table and three figures comparing attacked models, seeds pooled, with
bootstrap intervals.

Input: the results directories written by `undo relearn-attack` (each holds `results.json` and
an `undo.json` whose parent is the attacked checkpoint, with that checkpoint's whole manifest
chain), each `LABEL=RESULTS_DIR`, `LABEL=GLOB` or a bare directory (labelled by its name).
Several directories under one label are pooled as seeds of that model. Output, in `--out`:

- `report.md`: per model, the retain metric and the forget metric before the attack, the
  worst-case forget metric after it, the compute spent to make the model relative to the
  oracle's, and the relative robustness
  `(P_model - P_unlearned) / (P_oracle - P_unlearned)`, P the worst-case forget metric after
  the attack (the paper's definition: 0 = as fragile as unlearning alone, 1 = as robust as
  data filtering); and the same ratio over the whole attack, with each model's AUC (the mean
  of its worst-case curve) in place of P. Each with its 95% bootstrap interval, and a
  statement of whether the model is significantly more robust than the unlearned model
  (interval above 0%) and below, level with or above the oracle (interval below, around or
  above 100%).
- `relearn_curves.png` (pooled worst-case curves with their bands), `pareto.png` (relative
  compute against relative robustness, with intervals) and `retain_vs_forget.png`;
  `report.json` with the same numbers.

Pooling: a label's value (final, AUC, curve point, retain, compute) is the mean over its seeds.
The bootstrap (`bootstrap`) resamples, in each of `samples` rounds, each label's seeds with
replacement and, within them, the evaluation items (one draw of the items shared by every
model evaluated on the same set, so the comparison is paired), recomputes every seed's curve
from the per-item values results.json keeps with each worst-case point, and takes the ratio
again; the interval is the 2.5-97.5 percentile. The worst configuration of each point is held
fixed within a seed (relearn-attack's own band re-selects it). A label with one seed and no
per-item values (results of undo < 0.9) has no interval.

Compute of a model = the FLOPs recorded in its manifest chain (every stage's `compute.flops`),
minus the chain of the base model when the base is one of its ancestors: what it cost to make
this model from the shared base (unlearning + distillation for UNDO; the whole training for the
oracle, which does not descend from the base).
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from undo_cli.errors import UsageError
from undo_cli.gates import check_gates, matrix_gate_values, raise_failed_gates
from undo_cli.jsontext import to_json
from undo_cli.options.text import Condition
from undo_cli.records import check_attack_results, check_manifest, read_json_file
from undo_cli.stats import (
    BOOTSTRAP_SAMPLES,
    LEVEL,
    column_percentiles,
    curve_from_items,
    percentile,
    resample_counts,
    trapezoid_mean,
)

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


@dataclass
class PooledModel:
    """Every seed (results directory) of one label."""

    label: str
    seeds: list[AttackedModel]
    compute: float | None = None  # FLOPs to make it from the base (mean over seeds)

    def mean(self, value_of) -> float | None:
        """The mean over seeds of `value_of(seed)` (None if any seed lacks it)."""
        values = [value_of(m) for m in self.seeds]
        if any(v is None for v in values):
            return None
        return float(np.mean(values))

    @property
    def fingerprints(self) -> set[str | None]:
        return {m.fingerprint for m in self.seeds}

    @property
    def has_items(self) -> bool:
        return all("items" in p for m in self.seeds for p in m.results["worst_case"])


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
    flops = sum(float((m.get("compute") or {}).get("flops") or 0.0) for m in unique.values())
    return flops, prints


def load_attacked(label: str, directory: str | Path) -> AttackedModel:
    """The results directory `directory` under `label`."""
    directory = Path(directory)
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


def parse_specs(specs: list[str]) -> dict[str, list[Path]]:
    """`LABEL=RESULTS_DIR`, `LABEL=GLOB` or `RESULTS_DIR` -> directories per label, in order;
    a label given several times (or a glob matching several directories) pools them as
    seeds."""
    groups: dict[str, list[Path]] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        if not label:
            raise UsageError(f"{spec!r}: empty label (use LABEL=RESULTS_DIR)")
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise UsageError(f"{spec!r}: the pattern matches no directory")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(path)]
        for p in paths:
            if p in groups.setdefault(label, []):
                raise UsageError(f"{p} is given twice under label {label!r}")
            groups[label].append(p)
    return groups


def relative_robustness(p_model: float, p_unlearned: float, p_oracle: float) -> float | None:
    """(P_model - P_unlearned) / (P_oracle - P_unlearned); None when the denominator is 0."""
    span = p_oracle - p_unlearned
    if span == 0:
        return None
    return (p_model - p_unlearned) / span


# ------------------------------------------------------------------------------- bootstrap


def _seed_samples(model: AttackedModel, weights: dict[int, np.ndarray], samples: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seed under the item resamples: (final, AUC) `[samples]` each and the curve
    `[samples, points]`; the stored values repeated where its points keep no items."""
    worst = model.results["worst_case"]
    steps = [p["step"] for p in worst]
    if worst and all("items" in p for p in worst):
        n = len(worst[0]["items"]["num"])
        curve = curve_from_items(worst, model.forget_metric, weights.get(n))
        if curve.shape[0] == 1:
            curve = np.repeat(curve, samples, 0)
    else:
        curve = np.tile(np.array([[p["value"] for p in worst]], dtype=np.float64),
                        (samples, 1))
    return curve[:, -1], trapezoid_mean(steps, curve), curve


def bootstrap(models: dict[str, PooledModel], *, samples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per label, resampled pooled `final`, `auc` `[samples]` and `curve` `[samples, steps]`
    (on the steps every seed evaluated; module doc)."""
    rng = np.random.default_rng([seed, 17])
    sizes = {len(p["items"]["num"]) for pooled in models.values() for m in pooled.seeds
             for p in m.results["worst_case"] if "items" in p}
    weights = {n: resample_counts(n, samples, rng) for n in sorted(sizes)}
    out = {}
    for label, pooled in models.items():
        per_seed = [_seed_samples(m, weights, samples) for m in pooled.seeds]
        draws = rng.integers(0, len(per_seed), size=(samples, len(per_seed)))
        rows = np.arange(samples)[:, None]
        finals = np.stack([f for f, _, _ in per_seed], 1)[rows, draws].mean(1)
        aucs = np.stack([a for _, a, _ in per_seed], 1)[rows, draws].mean(1)
        steps = _common_steps(pooled)
        indexes = [_step_index(m) for m in pooled.seeds]
        on_steps = [c[:, [index[s] for s in steps]]
                    for index, (_, _, c) in zip(indexes, per_seed)]
        curve = np.zeros((samples, len(steps)))
        for column in draws.T:  # the mean over the drawn seeds, one draw at a time
            for k, seed_curve in enumerate(on_steps):
                picked = column == k
                curve[picked] += seed_curve[picked]
        out[label] = {"final": finals, "auc": aucs, "steps": np.asarray(steps),
                      "curve": curve / len(per_seed)}
    return out


def _step_index(model: AttackedModel) -> dict[int, int]:
    """Where each step lies in the worst-case curve (indexed once: the curve may be long)."""
    worst = model.results["worst_case"]
    return {worst[i]["step"]: i for i in range(len(worst) - 1, -1, -1)}  # the first of each


def _steps(model: AttackedModel) -> list[int]:
    return [p["step"] for p in model.results["worst_case"]]


def _common_steps(pooled: PooledModel) -> list[int]:
    common = set(_steps(pooled.seeds[0]))
    for m in pooled.seeds[1:]:
        common &= set(_steps(m))
    return sorted(common)


def _ratio_samples(model: np.ndarray, unlearned: np.ndarray, oracle: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (model - unlearned) / (oracle - unlearned)


def significance(lower: float | None, upper: float | None) -> dict[str, Any] | None:
    """What a relative-robustness interval says: above the unlearned model (lower > 0), and
    `below`, `level` with or `above` the oracle (upper < 1, 1 inside, lower > 1)."""
    if lower is None or upper is None:
        return None
    versus = "below" if upper < 1 else "above" if lower > 1 else "level"
    return {"above_unlearned": lower > 0, "versus_oracle": versus}


# ---------------------------------------------------------------------------------- report


def build_report(specs: list[str], *, roles: dict[str, str] | None = None,
                 retain_metric: str | None = None, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0, max_retain_drop: float = 0.1) -> dict[str, Any]:
    """Numbers of the report (also written as report.json)."""
    groups = parse_specs(specs)
    models = {label: PooledModel(label, [load_attacked(label, p) for p in paths])
              for label, paths in groups.items()}
    labels = list(models)
    metrics = {m.forget_metric for pooled in models.values() for m in pooled.seeds}
    if len(metrics) != 1:
        raise UsageError(f"the results use different forget metrics {sorted(metrics)}")
    forget_metric = metrics.pop()
    roles = dict(roles or {})
    for role in ROLES:
        roles.setdefault(role, role if role in labels else "")
        if roles[role] and roles[role] not in labels:
            raise UsageError(f"--{role} {roles[role]!r} is not one of the labels {labels}")
    base = models.get(roles["base"])
    base_flops = base.mean(lambda m: m.chain_flops) if base else None
    for pooled in models.values():
        if pooled is base:
            pooled.compute = 0.0
        else:
            pooled.compute = pooled.mean(
                lambda m: m.chain_flops - base_flops
                if base is not None and base.fingerprints & m.ancestors else m.chain_flops)
    oracle, unlearned = models.get(roles["oracle"]), models.get(roles["unlearned"])
    if retain_metric is None:
        retain_metric = _default_retain_metric(forget_metric, next(iter(models.values())))
    resampled = bootstrap(models, samples=samples, seed=seed)
    oracle_compute = oracle.compute if oracle and oracle.compute else None
    rows = []
    for label, pooled in models.items():
        own = resampled[label]
        uncertain = len(pooled.seeds) > 1 or pooled.has_items
        row = {
            "model": label, "results": str(pooled.seeds[0].path),
            "results_dirs": [str(m.path) for m in pooled.seeds], "seeds": len(pooled.seeds),
            "retain": pooled.mean(lambda m: m.results.get("initial", {}).get(retain_metric))
            if retain_metric else None,
            "forget_before": pooled.mean(lambda m: m.forget_before),
            "forget_after": pooled.mean(lambda m: m.forget_after),
            "auc": pooled.mean(lambda m: m.auc),
            "compute_flops": pooled.compute,
            "relative_compute": (pooled.compute / oracle_compute)
            if oracle_compute and pooled.compute is not None else None,
        }
        for key, samples_of in (("forget_after", own["final"]), ("auc", own["auc"])):
            low, high = percentile(samples_of) if uncertain else (None, None)
            row[f"{key}_lower"], row[f"{key}_upper"] = low, high
        row["significance"] = {}
        for name, key in (("relative_robustness", "forget_after"),
                          ("relative_robustness_auc", "auc")):
            point = low = high = None
            if oracle and unlearned and None not in (row[key], _mean_of(oracle, key),
                                                     _mean_of(unlearned, key)):
                point = relative_robustness(row[key], _mean_of(unlearned, key),
                                            _mean_of(oracle, key))
                kind = "final" if key == "forget_after" else "auc"
                if point is not None and uncertain and pooled not in (oracle, unlearned):
                    low, high = percentile(_ratio_samples(
                        own[kind], resampled[unlearned.label][kind],
                        resampled[oracle.label][kind]))
                    low, high = _finite_or_none(low), _finite_or_none(high)
            row[name], row[f"{name}_lower"], row[f"{name}_upper"] = point, low, high
            verdict = significance(low, high)
            if verdict is not None:
                row["significance"]["final" if key == "forget_after" else "auc"] = verdict
        rows.append(row)
    curves = {}
    for label, pooled in models.items():
        steps = resampled[label]["steps"].tolist()
        values = [{p["step"]: p["value"] for p in reversed(m.results["worst_case"])}
                  for m in pooled.seeds]
        mean = [float(np.mean([v[s] for v in values])) for s in steps]
        lows, highs = column_percentiles(resampled[label]["curve"])
        curves[label] = [{"step": s, "value": v, "lower": lo, "upper": hi}
                         if len(pooled.seeds) > 1 or pooled.has_items
                         else {"step": s, "value": v}
                         for s, v, lo, hi in zip(steps, mean, lows, highs)]
    return {"forget_metric": forget_metric, "retain_metric": retain_metric, "roles": roles,
            "direction": next(iter(models.values())).seeds[0].results.get("direction"),
            "rows": rows, "curves": curves, "headline": "relative_robustness_auc",
            "uncertainty": {"method": "bootstrap over seeds and items", "samples": samples,
                            "level": LEVEL, "seed": seed},
            **matrix_sections(models, roles, retain_metric, rows, max_retain_drop,
                              samples, seed)}


# ------------------------------------------------------------------------- attack matrix


def matrix_sections(models: dict[str, PooledModel], roles: dict[str, str],
                    retain_metric: str | None, rows: list[dict[str, Any]],
                    max_retain_drop: float, samples: int, seed: int) -> dict[str, Any]:
    """report.json's `matrix` (models x attack families: worst case, oracle-controlled
    verdicts with and without the utility limit, collapse) and `attacker_cost` (cost curves,
    the attacker compute to reach half of the base model's recovery next to the defender's
    compute): `undo_cli.matrix`."""
    from undo_cli.matrix import attack_matrix, compute_to_reach

    results = {label: [m.results for m in pooled.seeds] for label, pooled in models.items()}
    matrix = attack_matrix(results, oracle=roles.get("oracle") or None,
                           retain_metric=retain_metric, max_retain_drop=max_retain_drop,
                           samples=samples, seed=seed)
    cost = compute_to_reach(results, base=roles.get("base") or None,
                            retain_metric=retain_metric, max_retain_drop=max_retain_drop,
                            samples=samples, seed=seed)
    for row in rows:
        cost[row["model"]]["defender_flops"] = row["compute_flops"]
    return {"matrix": matrix, "attacker_cost": cost}


def matrix_markdown(report: dict[str, Any]) -> list[str]:
    """The matrix and attacker-cost sections of report.md."""
    matrix, cost = report.get("matrix"), report.get("attacker_cost") or {}
    if not matrix or not matrix["families"]:
        return []
    fams = matrix["families"]
    lines = ["", "## Attack matrix", "",
             f"Worst-case `{report['forget_metric']}` per attack family (evaluations whose "
             f"retain metric `{matrix['retain_metric']}` dropped by more than "
             f"{matrix['max_retain_drop']:g} do not count), and the oracle-controlled "
             "verdict: **recovered** = significantly above the oracle under the same attack; "
             "**teaches** = the oracle gains as much (the attack teaches rather than "
             "recovers); level / below oracle otherwise. Where it differs, the verdict without "
             "the utility limit follows in brackets; *collapsed*: the model's retain metric "
             "collapses under that attack (beyond the limit).", "",
             "| model | " + " | ".join(fams) + " |", "| --- |" + " --- |" * len(fams)]
    for model in matrix["models"]:
        cells = []
        for fam in fams:
            c = matrix["cells"][fam][model]
            if not c.get("attacked"):
                cells.append("n/a")
                continue
            text = f"{_fmt(c['worst'])} {c.get('verdict') or ''}".strip()
            if c.get("verdict_no_limit") and c.get("verdict_no_limit") != c.get("verdict"):
                text += f" ({c['verdict_no_limit']} without the limit)"
            if c.get("collapsed"):
                text += ", *collapsed*"
            cells.append(text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "![attack matrix](matrix.png)"]
    if cost:
        lines += ["", "## Attacker compute", "",
                  "FLOPs an attacker needs (one run, the engine's accounting) for the worst "
                  "case to reach half of the base model's recovery, with its 95% interval, "
                  "next to the compute the defender spent on the model.", "",
                  "| model | attacker FLOPs to half the base's recovery | defender FLOPs |",
                  "| --- | --- | --- |"]
        for model, c in cost.items():
            if c.get("target") is None:
                reach = "n/a"  # the base itself, no base label, or nothing to recover
            elif not c.get("reached"):
                reach = "not reached within the budget"
            else:
                upper = _fmt(c["upper"]) if c.get("upper") is not None else "not reached"
                reach = f"{_fmt(c['flops_to_target'])} [{_fmt(c.get('lower'))}, {upper}]"
            lines.append(f"| {model} | {reach} | {_fmt(c.get('defender_flops'))} |")
        lines += ["", "![worst case against attacker compute](attacker_cost.png)"]
    return lines


def _mean_of(pooled: PooledModel, key: str) -> float | None:
    return pooled.mean(lambda m: m.forget_after if key == "forget_after" else m.auc)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _default_retain_metric(forget_metric: str, pooled: PooledModel) -> str | None:
    """The forget metric's kind on another set (`forget.accuracy` -> `retain.accuracy`)."""
    set_name, kind = forget_metric.split(".", 1)
    candidates = [k for k in pooled.seeds[0].results.get("initial", {})
                  if k.endswith("." + kind) and not k.startswith(set_name + ".")]
    return candidates[0] if candidates else None


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if pct:
        return f"{round(100 * value):d}%"  # rounded first: `0%`, never `-0%`
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def with_interval(row: dict[str, Any], key: str, pct: bool = False) -> str:
    """`56% [31%, 82%]`: a value and its 95% interval (the value alone without one)."""
    text = _fmt(row.get(key), pct)
    low, high = row.get(f"{key}_lower"), row.get(f"{key}_upper")
    if row.get(key) is None or low is None or high is None:
        return text
    return f"{text} [{_fmt(low, pct)}, {_fmt(high, pct)}]"


def verdicts(report: dict[str, Any]) -> list[str]:
    """One sentence per model with an interval of its relative robustness."""
    lines = []
    for row in report["rows"]:
        for kind, key, what in (("auc", "relative_robustness_auc", "over the attack (AUC, "
                                 "the headline)"),
                                ("final", "relative_robustness", "after the attack")):
            verdict = row["significance"].get(kind)
            if verdict is None:
                continue
            above = ("significantly more robust than the unlearned model"
                     if verdict["above_unlearned"]
                     else "not significantly more robust than the unlearned model")
            oracle = {"below": "significantly less robust than the oracle",
                      "level": "level with the oracle (its interval contains 100%)",
                      "above": "significantly more robust than the oracle"}
            lines.append(f"- **{row['model']}**, {what}: relative robustness "
                         f"{with_interval(row, key, pct=True)} ({row['seeds']} seed"
                         f"{'s' if row['seeds'] != 1 else ''}): {above}; "
                         f"{oracle[verdict['versus_oracle']]}.")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: the table, the verdicts and the figures, readable on its own."""
    fm, rm = report["forget_metric"], report["retain_metric"] or "retain"
    u = report["uncertainty"]
    lines = [
        "# UNDO report", "",
        f"Forget metric: `{fm}` (worst case over the attack's configurations); retain "
        f"metric: `{rm}`. Relative robustness = (P_model - P_unlearned) / (P_oracle - "
        "P_unlearned) with P the forget metric after the attack; the AUC column, the "
        "headline, puts each model's mean over its whole worst-case curve in place of P (at "
        "the same cost its 95% interval is 3-4x narrower than the final point's: "
        "docs/benchmarks.md, \"Intervals\"); compute relative to the oracle's. Several "
        "results directories under one label are pooled as seeds (means); brackets: 95% "
        "bootstrap intervals "
        f"({u['samples']} resamples of the seeds and, within them, the evaluation items).", "",
        f"| model | seeds | {rm} | {fm} before attack | {fm} after attack | relative compute "
        "| relative robustness | relative robustness (AUC) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['seeds']} | {_fmt(r['retain'])} | "
                     f"{_fmt(r['forget_before'])} | {with_interval(r, 'forget_after')} | "
                     f"{_fmt(r['relative_compute'], pct=True)} | "
                     f"{with_interval(r, 'relative_robustness', pct=True)} | "
                     f"{with_interval(r, 'relative_robustness_auc', pct=True)} |")
    found = verdicts(report)
    if found:
        lines += ["", "## Is it significant?", "", *found]
    lines += matrix_markdown(report)
    lines += ["", "![worst-case relearning curves](relearn_curves.png)", "",
              "![compute against robustness](pareto.png)", "",
              "![retain against relearned forget performance](retain_vs_forget.png)", ""]
    return "\n".join(lines)


def write_report(specs: list[str], out: str | Path, *, roles: dict[str, str] | None = None,
                 retain_metric: str | None = None, overwrite: bool = False,
                 samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, max_retain_drop: float = 0.1,
                 fail_if: Sequence[Condition] = ()) -> dict[str, Any]:
    """Build the report and write `report.md`, `report.json` and the figures into `out`.
    `fail_if` gates (`ReportOptions.fail_if`, parsed when the group was built; on
    `matrix.FAMILY.MODEL.worst|verdict|...`, `undo_cli.gates.matrix_gate_values`) are checked
    after writing (`GateFailed`)."""
    from undo_cli.checkpoint import atomic_output, build_manifest, write_manifest
    from undo_cli.plots import plot_matrix_figures, plot_report

    gates = [condition.expr for condition in fail_if]
    report = build_report(specs, roles=roles, retain_metric=retain_metric, samples=samples,
                          seed=seed, max_retain_drop=max_retain_drop)
    values = matrix_gate_values(report["matrix"])
    for expr in gates:
        expr.check_names(set(values))
    if gates:
        report["gates"] = check_gates(gates, values)
        for record, text in zip(report["gates"], fail_if):
            record["expression"] = str(text)  # as given, not as rewritten
    # REPORT_DIR may not lie inside, or (with --overwrite) replace, a results directory.
    inputs = [Path(d) for row in report["rows"] for d in row["results_dirs"]]
    with atomic_output(out, inputs=inputs, overwrite=overwrite) as tmp:
        (tmp / "report.md").write_text(render_markdown(report))
        (tmp / "report.json").write_text(to_json(report, indent=2) + "\n")
        figures = plot_report(report, tmp)
        figures += plot_matrix_figures(report, tmp)
        write_manifest(tmp, build_manifest("report", arguments={
            "results": specs, "roles": report["roles"], "bootstrap_samples": samples,
            "seed": seed, "max_retain_drop": max_retain_drop, "fail_if": list(fail_if)}))
    report["figures"] = figures
    if gates:
        raise_failed_gates(report["gates"])
    return report
