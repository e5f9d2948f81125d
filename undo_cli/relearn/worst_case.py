"""The worst case of a relearning attack, from its runs' curves: pure statistics, no torch.

At each step the value of a configuration (learning rate, quantised or not) is the mean over
its seeds (over the seeds that have a value at that step); the *worst case* for the defender
is the best of those means over configurations (the max for accuracy-like metrics, the min
for loss-like ones), and `worst_case[i]["lr"]` the learning rate that gives it (`null` at step
0, the unattacked model, which every run shares). A diverged run has no value after it
diverged and does not count there. Summary numbers: `final` (the worst case at the last step
with a value), `auc` (the trapezoid mean of the worst-case curve over the attack),
`steps_to_threshold` (the first step reaching `threshold`) with the other sets' metrics there,
`best_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.jsontext import is_finite_number
from undo_cli.stats import is_uncertainty

MAXIMISED = ("accuracy", "accuracy_norm")
MINIMISED = ("loss", "ppl")
COUNTS = ("tokens", "n")  # counts, not performance: never averaged into summaries


def metric_direction(metric: str) -> str:
    """"max" for accuracy-like metrics (`accuracy`, `accuracy_norm`), "min" for loss-like ones
    (`loss`, `ppl`); `UsageError` otherwise."""
    key = metric.rsplit(".", 1)[-1]
    if key in MAXIMISED:
        return "max"
    if key in MINIMISED:
        return "min"
    raise UsageError(f"--forget-metric {metric!r}: the attacker recovers an accuracy "
                     f"({', '.join(MAXIMISED)}) or a loss ({', '.join(MINIMISED)})")


def attackable_metrics(names: Sequence[str]) -> list[str]:
    """The names among `names` that can be a forget metric (accuracy- or loss-like)."""
    return [n for n in names if n.rsplit(".", 1)[-1] in MAXIMISED + MINIMISED]


def resolve_forget_metric(metric: str | None, available: Sequence[str]) -> str:
    """Check `metric` against the metrics the eval sets give (before any work).

    None picks `forget.accuracy`, else `forget.loss`, when a set named `forget` gives them.
    `UsageError` naming the available metrics otherwise.
    """
    choices = attackable_metrics(available)
    shown = ", ".join(choices) or "none"
    if metric is None:
        for guess in ("forget.accuracy", "forget.accuracy_norm", "forget.loss"):
            if guess in choices:
                return guess
        raise UsageError(f"give --forget-metric SET.METRIC (available: {shown})")
    if metric not in choices:
        extra = ""
        set_name = metric.rsplit(".", 1)[0]
        own = [a.rsplit(".", 1)[-1] for a in choices if a.rsplit(".", 1)[0] == set_name]
        if metric in available:
            extra = " (a count, not a performance metric)"
        elif own:
            extra = (f" (set {set_name!r} gives {', '.join(own)}: text sets have no accuracy, "
                     "multiple-choice sets no loss)")
        raise UsageError(f"--forget-metric {metric!r} is not a metric of the eval sets{extra}; "
                         f"available: {shown}")
    metric_direction(metric)
    return metric


# ----------------------------------------------------------------------------- the worst case


Key = tuple[str, bool]  # (configuration name, quantised)
UNATTACKED = None  # the `config` of the worst case at step 0 when no attack beats the model


def config_key(run: dict[str, Any]) -> Key:
    """The configuration a run belongs to (everything but its seed) and whether it was
    quantised. Results written before configurations had names group by learning rate."""
    name = run.get("config")
    if name is None:
        lr = run.get("lr")
        name = "original" if lr is None else f"lr{lr:g}"
    return name, bool(run.get("quantize"))


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def _counted(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The curve entries of `run` that count (not excluded by the utility rule)."""
    excluded = set(run.get("excluded_steps") or ())
    return [e for e in run.get("curve", []) if e.get("step") not in excluded]


def group_values(runs: Sequence[dict[str, Any]], metric: str
                 ) -> dict[int, dict[Key, list[float]]]:
    """step -> configuration -> the finite values of `metric` of that configuration's seeds.

    A static attack (no finetuning: prompting, directional ablation, quantising the original
    model; `"static": true`) is measured once, at step 0, and its value holds at every step of
    the attack: the attacker can use it whenever it likes.
    """
    table: dict[int, dict[Key, list[float]]] = {}
    static: dict[Key, list[float]] = {}
    for run in runs:
        key = config_key(run)
        for entry in _counted(run):
            value = entry.get(metric)
            if not is_finite_number(value):
                continue
            target = static if run.get("static") else table.setdefault(int(entry["step"]), {})
            target.setdefault(key, []).append(float(value))
    for step in set(table) | ({0} if static else set()):
        table.setdefault(step, {}).update({k: list(v) for k, v in static.items()})
    return table


def static_keys(runs: Sequence[dict[str, Any]]) -> set[Key]:
    return {config_key(r) for r in runs if r.get("static")}


def worst_case_curve(runs: Sequence[dict[str, Any]], metric: str,
                     direction: str) -> list[dict[str, Any]]:
    """The defender's worst case at each step (module doc): the best over configurations of
    the seed-mean of `metric`; ties go to the configuration met first. At step 0 a finetuning
    configuration is the unattacked model (`config` and `lr` null)."""
    quantizing = any(run.get("quantize") for run in runs)
    statics = static_keys(runs)
    lrs = {config_key(r): r.get("lr") for r in runs}
    out = []
    for step, groups in sorted(group_values(runs, metric).items()):
        best_key, best = None, None
        for key, values in groups.items():
            mean = sum(values) / len(values)
            if best is None or _better(mean, best, direction):
                best_key, best = key, mean
        entry: dict[str, Any] = {"step": step, "value": best, "lr": lrs.get(best_key),
                                 "config": best_key[0]}
        if step == 0 and best_key not in statics:
            entry["lr"], entry["config"] = None, UNATTACKED  # every run starts from the model
        if quantizing:
            entry["quantized"] = best_key[1]
        out.append(entry)
    return out


def group_means(runs: Sequence[dict[str, Any]], step: int, key: Key) -> dict[str, float]:
    """Seed-mean of every metric of configuration `key` at `step` (a static attack's at its
    one evaluation; finite values only)."""
    sums: dict[str, list[float]] = {}
    for run in runs:
        if config_key(run) != key:
            continue
        for entry in _counted(run):
            if entry.get("step") != step and not run.get("static"):
                continue
            for name, value in entry.items():
                if name != "step" and is_finite_number(value):
                    sums.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sums.items()}


def area_under_curve(points: Sequence[tuple[float, float]]) -> float | None:
    """Trapezoid area under `(step, value)` points divided by their step span (the mean
    value); a single point gives its value, no point None."""
    if not points:
        return None
    if len(points) == 1 or points[-1][0] == points[0][0]:
        return float(points[-1][1])
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def point_metrics(runs: Sequence[dict[str, Any]], initial: dict[str, Any],
                  entry: dict[str, Any]) -> dict[str, float]:
    """Every metric at a worst-case point: the seed means of the configuration that gives it;
    for the unattacked model at step 0, the initial metrics."""
    if entry["step"] == 0 and entry.get("config", "original") in (UNATTACKED, "original") \
            and not entry.get("quantized"):
        return {k: v for k, v in initial.items() if is_finite_number(v)}
    name = entry.get("config")
    if name is None:  # results written before configurations had names
        name = f"lr{entry['lr']:g}"
    return group_means(runs, entry["step"], (name, bool(entry.get("quantized"))))


def apply_retain_rule(runs: Sequence[dict[str, Any]], initial: dict[str, Any],
                      retain_metric: str, max_drop: float) -> int:
    """The utility rule: mark (`run["excluded_steps"]`) every evaluation at which the retain
    metric is more than `max_drop` worse than the unattacked model's (lower for accuracy-like
    metrics, higher for loss-like ones), or not a number. Returns how many were excluded."""
    direction = metric_direction(retain_metric)
    base = initial.get(retain_metric)
    if not is_finite_number(base):
        raise UsageError(f"--retain-metric {retain_metric!r} has no value before the attack")
    excluded = 0
    for run in runs:
        steps = []
        for entry in run.get("curve", []):
            value = entry.get(retain_metric)
            worse = (base - value if direction == "max" else value - base) \
                if is_finite_number(value) else math.inf
            if worse > max_drop:
                steps.append(entry["step"])
        run["excluded_steps"] = steps
        excluded += len(steps)
    return excluded


def summarize(runs: Sequence[dict[str, Any]], worst: Sequence[dict[str, Any]], metric: str,
              direction: str, initial: dict[str, Any],
              threshold: float | None = None) -> dict[str, Any]:
    """The `summary` entry of results.json (docs/relearn-results.md)."""
    forget_set = metric.rsplit(".", 1)[0]
    final = worst[-1] if worst else None
    to_threshold, retain = None, None
    if threshold is not None:
        for entry in worst:
            v = entry["value"]
            if v >= threshold if direction == "max" else v <= threshold:
                to_threshold = entry["step"]
                retain = {k: v for k, v in point_metrics(runs, initial, entry).items()
                          if k.rsplit(".", 1)[0] != forget_set
                          and k.rsplit(".", 1)[-1] not in COUNTS and not is_uncertainty(k)}
                break
    return {
        "initial": initial.get(metric),
        "final": final["value"] if final else None,
        "final_step": final["step"] if final else None,
        "auc": area_under_curve([(e["step"], e["value"]) for e in worst]),
        "threshold": threshold,
        "steps_to_threshold": to_threshold,
        "retain_at_threshold": retain,
        "best_lr": final["lr"] if final else None,
        "best_config": final.get("config") if final else None,
        "excluded_evaluations": sum(len(r.get("excluded_steps") or ()) for r in runs),
    }


_DESCRIBED = ("lr", "optimizer", "schedule", "batch_size", "mode", "lora_rank", "lora_alpha",
              "attack", "few_shot", "layer")


def per_config_table(runs: Sequence[dict[str, Any]], metric: str,
                     direction: str) -> list[dict[str, Any]]:
    """Per configuration (and quantised or not): its settings, runs, diverged runs, excluded
    evaluations, the seed-mean forget metric at its last step and the best over steps."""
    table = group_values(runs, metric)
    statics = static_keys(runs)
    keys: list[Key] = []
    for run in runs:
        if config_key(run) not in keys:
            keys.append(config_key(run))
    out = []
    for key in keys:
        members = [r for r in runs if config_key(r) == key]
        steps = [0] if key in statics else sorted(table)
        means = [(step, sum(table[step][key]) / len(table[step][key])) for step in steps
                 if key in table.get(step, {})]
        best = None
        for _, v in means:
            if best is None or _better(v, best, direction):
                best = v
        out.append({"config": key[0], **{k: members[0].get(k) for k in _DESCRIBED
                                           if k in members[0]},
                    "quantized": key[1], "runs": len(members),
                    "diverged_runs": sum(bool(r.get("diverged")) for r in members),
                    "excluded_evaluations": sum(len(r.get("excluded_steps") or ())
                                                for r in members),
                    "final": means[-1][1] if means else None,
                    "final_step": means[-1][0] if means else None, "best": best})
    return out


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every metric at the end of the worst case (`point_metrics` of its last point)."""
    worst = results.get("worst_case") or []
    if not worst:
        return {}
    return point_metrics(results["runs"], results["initial"], worst[-1])
