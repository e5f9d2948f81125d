"""The attack matrix of `undo report`: per model and attack family, the worst-case forget
metric, the oracle-controlled verdict (with and without the utility limit) and the attacker's
cost. Pure numbers on results.json dicts (numpy only); `report.py` pools and writes them.
The names `undo report --fail-if` reads from it are `undo_cli.gates.namespaces`'s
(`matrix_gate_values`).

Families (`family_of`): finetune, quantize (quantised twins, quantised originals, QLoRA),
prune (alone and before finetuning), benign (out-of-domain finetuning), embedding (soft
prompts), few-shot, ablate-direction.

- **Worst case of a family**: over the family's configurations, the best seed-mean of the
  forget metric at any evaluation (a static attack's one value), exactly as relearn-attack's
  worst case, restricted to the family. Pooled over a label's results directories (seeds of
  the model) by their mean.
- **Utility limit** (`--max-retain-drop D`, default 0.1): an evaluation whose retain metric
  is more than D worse than the model's own before the attack does not count. The worst
  case without the limit is also kept; a model whose worst evaluation without the limit lies
  beyond it is *collapsed* under that family (named, not dropped).
- **Verdict** (model vs the oracle under the same family): d = P_model - P_oracle (sign so
  that positive means more forget capability), with a 95% parametric bootstrap interval from
  the two evaluations' standard errors (`SET.METRIC_stderr` of each evaluation; seeds of a
  label averaged). `recovered`: the interval lies above 0 (significantly above the oracle).
  `teaches`: not recovered, and the oracle's own gain under the family (its worst case minus
  its value before the attack) is significantly positive and at least the model's gain.
  `below oracle`: the interval lies under 0. Otherwise `level`. The oracle's own cell is
  `oracle`.
- **Attacker cost**: each evaluation carries the attacker's tokens and FLOPs to that point
  (results.json `cost`); the cost curve of a model is, for every FLOP budget F, the best
  evaluation reachable with at most F FLOPs in one run (seed-mean per configuration). The
  evaluations of a label's seeds are averaged per (configuration, step) first. The
  compute to reach half of the base model's recovery is the first F at which the curve
  reaches `before + (P_base - before) / 2`, P_base the base model's worst case after the
  attack; its interval is the parametric bootstrap's, "not reached" where more than 2.5% of
  the resamples never reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from undo_cli.stats import BOOTSTRAP_SAMPLES, percentile

DEFAULT_MAX_RETAIN_DROP = 0.1
FAMILIES = ("finetune", "quantize", "prune", "benign", "embedding", "few-shot",
            "ablate-direction")
FAMILY_OF_ATTACK = {"finetune": "finetune", "few-shot": "few-shot",
                    "ablate-direction": "ablate-direction", "quantize": "quantize",
                    "prune": "prune", "prune+finetune": "prune", "qlora": "quantize",
                    "benign-finetune": "benign", "embedding": "embedding"}


def family_of(run: dict[str, Any]) -> str:
    """The family of a run (a quantised twin belongs to `quantize`)."""
    if run.get("quantize") and run.get("attack") != "qlora":
        return "quantize"
    return FAMILY_OF_ATTACK.get(str(run.get("attack")), str(run.get("attack")))


def _sign(direction: str) -> float:
    return 1.0 if direction == "max" else -1.0


def _worse(retain: float | None, before: float | None, retain_metric: str,
           limit: float) -> bool:
    """Whether `retain` is more than `limit` worse than `before` (or not a number)."""
    if before is None:
        return False
    if retain is None or not math.isfinite(retain):
        return True
    lower_is_better = retain_metric.rsplit(".", 1)[-1] in ("loss", "ppl")
    drop = retain - before if lower_is_better else before - retain
    return drop > limit


def evaluations(results: dict[str, Any], family: str, retain_metric: str | None,
                limit: float | None) -> list[dict[str, Any]]:
    """The family's evaluations, seed-averaged per (configuration, step): value, stderr,
    retain, FLOPs, and whether the utility limit excludes it."""
    metric = results["forget_metric"]
    before = (results.get("initial") or {}).get(retain_metric) if retain_metric else None
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in results.get("runs") or []:
        if family_of(run) != family:
            continue
        cost = {c["step"]: c for c in run.get("cost") or []}
        for entry in run.get("curve") or []:
            value = entry.get(metric)
            if value is None or not math.isfinite(value):
                continue
            key = (run.get("config"), bool(run.get("quantize")), entry["step"])
            groups.setdefault(key, []).append({
                "value": float(value), "stderr": entry.get(f"{metric}_stderr") or 0.0,
                "retain": entry.get(retain_metric) if retain_metric else None,
                "flops": float((cost.get(entry["step"]) or {}).get("flops") or 0.0)})
    out = []
    for (config, quantized, step), members in groups.items():
        n = len(members)
        retain_values = [m["retain"] for m in members]
        retain = (None if any(r is None for r in retain_values)
                  else float(np.mean(retain_values)))
        out.append({"config": config, "quantized": quantized, "step": step,
                    "value": float(np.mean([m["value"] for m in members])),
                    "stderr": float(math.sqrt(sum(m["stderr"] ** 2 for m in members)) / n),
                    "retain": retain, "flops": float(np.mean([m["flops"] for m in members])),
                    "collapsed": limit is not None and retain_metric is not None
                    and _worse(retain, before, retain_metric, limit)})
    return out


def worst(evals: Sequence[dict[str, Any]], direction: str,
          limit: bool) -> dict[str, Any] | None:
    """The best evaluation for the attacker (with `limit`: among those not collapsed)."""
    counted = [e for e in evals if not (limit and e["collapsed"])]
    if not counted:
        return None
    s = _sign(direction)
    return max(counted, key=lambda e: s * e["value"])


def families_present(models: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Families any model was attacked with, in `FAMILIES` order."""
    seen = {family_of(r) for seeds in models.values() for res in seeds
            for r in res.get("runs") or []}
    return [f for f in FAMILIES if f in seen] + sorted(seen - set(FAMILIES))


def _pooled(seeds: Sequence[dict[str, Any]], family: str, retain_metric: str | None,
            limit: float, use_limit: bool) -> dict[str, Any] | None:
    """A label's family worst case, pooled over its seeds (results directories)."""
    picks = []
    for res in seeds:
        found = worst(evaluations(res, family, retain_metric, limit),
                      res.get("direction") or "max", use_limit)
        if found is None:
            return None
        picks.append(found)
    n = len(picks)
    values = [p["value"] for p in picks]
    stderr = math.sqrt(sum(p["stderr"] ** 2 for p in picks)) / n
    if n > 1:  # the spread between seeds, when larger
        stderr = max(stderr, float(np.std(values, ddof=1) / math.sqrt(n)))
    return {"value": float(np.mean(values)), "stderr": stderr,
            "collapsed": any(p["collapsed"] for p in picks),
            "config": picks[0]["config"], "flops": float(np.mean([p["flops"] for p in picks]))}


def _before(seeds: Sequence[dict[str, Any]]) -> tuple[float | None, float]:
    metric = seeds[0]["forget_metric"]
    values = [(r.get("initial") or {}).get(metric) for r in seeds]
    if any(v is None for v in values):
        return None, 0.0
    stderrs = [(r.get("initial") or {}).get(f"{metric}_stderr") or 0.0 for r in seeds]
    return float(np.mean(values)), math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def verdict_cell(model: dict[str, Any] | None, oracle: dict[str, Any] | None,
                 model_before: float | None, oracle_before: tuple[float | None, float],
                 direction: str, rng: np.random.Generator, samples: int) -> dict[str, Any]:
    """The verdict of one cell (module doc) from the pooled worst cases."""
    if model is None:
        return {"verdict": None}
    if oracle is None:
        return {"verdict": None, "difference": None, "lower": None, "upper": None}
    s = _sign(direction)
    z = rng.standard_normal((2, samples))
    m = model["value"] + model["stderr"] * z[0]
    o = oracle["value"] + oracle["stderr"] * z[1]
    diff = s * (m - o)
    low, high = percentile(diff)
    out: dict[str, Any] = {"difference": s * (model["value"] - oracle["value"]),
                           "lower": low, "upper": high}
    o_before, o_before_se = oracle_before
    teaches = False
    if o_before is not None and model_before is not None:
        b = o_before + o_before_se * rng.standard_normal(samples)
        gain_o = s * (o - b)
        gain_lower = percentile(gain_o)[0]
        gain_m = s * (model["value"] - model_before)
        teaches = gain_lower > 0 and s * (oracle["value"] - o_before) >= gain_m
        out["oracle_gain"] = s * (oracle["value"] - o_before)
        out["model_gain"] = gain_m
    if low > 0:
        out["verdict"] = "recovered"
    elif teaches:
        out["verdict"] = "teaches"
    elif high < 0:
        out["verdict"] = "below oracle"
    else:
        out["verdict"] = "level"
    return out


def attack_matrix(models: dict[str, list[dict[str, Any]]], *, oracle: str | None,
                  retain_metric: str | None, max_retain_drop: float = DEFAULT_MAX_RETAIN_DROP,
                  samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """`{"families", "models", "cells": {family: {model: cell}}}`: each cell the worst case
    with and without the utility limit, `collapsed`, and both verdicts (module doc)."""
    rng = np.random.default_rng([seed, 29])
    families = families_present(models)
    direction = next(iter(models.values()))[0].get("direction") or "max"
    cells: dict[str, dict[str, Any]] = {}
    for family in families:
        row: dict[str, Any] = {}
        pooled = {label: {lim: _pooled(seeds, family, retain_metric, max_retain_drop, lim)
                          for lim in (True, False)} for label, seeds in models.items()}
        o_before = _before(models[oracle]) if oracle in models else (None, 0.0)
        for label, seeds in models.items():
            limited, unlimited = pooled[label][True], pooled[label][False]
            before = _before(seeds)[0]
            cell: dict[str, Any] = {
                "worst": limited["value"] if limited else before,
                "worst_no_limit": unlimited["value"] if unlimited else None,
                "config": (limited or unlimited or {}).get("config"),
                "collapsed": bool(unlimited and unlimited["collapsed"]),
                "attacked": unlimited is not None}
            if unlimited is None:
                cell["verdict"] = cell["verdict_no_limit"] = None
            elif label == oracle:
                cell["verdict"] = cell["verdict_no_limit"] = "oracle"
            else:
                ref = pooled.get(oracle, {})
                # with the limit, a model with nothing left counts as unattacked
                start = limited or {"value": before, "stderr": _before(seeds)[1],
                                    "collapsed": False}
                with_limit = verdict_cell(start, ref.get(True), before, o_before, direction,
                                          rng, samples)
                without = verdict_cell(unlimited, ref.get(False), before, o_before,
                                       direction, rng, samples)
                cell.update({k: with_limit.get(k) for k in ("verdict", "difference", "lower",
                                                            "upper", "oracle_gain",
                                                            "model_gain")})
                cell.update({f"{k}_no_limit": without.get(k)
                             for k in ("verdict", "difference", "lower", "upper")})
            row[label] = cell
        cells[family] = row
    return {"families": families, "models": list(models), "cells": cells,
            "max_retain_drop": max_retain_drop, "retain_metric": retain_metric,
            "method": "parametric bootstrap from the evaluations' standard errors",
            "samples": samples}


# --------------------------------------------------------------------------- attacker cost


def cost_curve(evals: Sequence[dict[str, Any]], direction: str,
               values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs sorted, best value reachable within each) over `evals` (`values`: resampled
    values `[samples, len(evals)]`, giving `[samples, len]` curves)."""
    order = np.argsort([e["flops"] for e in evals], kind="stable")
    flops = np.asarray([evals[i]["flops"] for i in order], dtype=np.float64)
    base = np.asarray([[e["value"] for e in evals]], dtype=np.float64) if values is None \
        else values
    s = _sign(direction)
    return flops, s * np.maximum.accumulate(s * base[:, order], axis=1)


def _pooled_evaluations(seeds: Sequence[dict[str, Any]], retain_metric: str | None,
                        limit: float) -> list[dict[str, Any]]:
    """Every family's evaluations within the utility limit, averaged over a label's seeds
    (results directories) where every seed has the same (configuration, step)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for res in seeds:
        for fam in families_present({"": [res]}):
            for e in evaluations(res, fam, retain_metric, limit):
                if not e["collapsed"]:
                    groups.setdefault((fam, e["config"], e["quantized"], e["step"]),
                                      []).append(e)
    n = len(seeds)
    return [{"value": float(np.mean([e["value"] for e in group])),
             "stderr": math.sqrt(sum(e["stderr"] ** 2 for e in group)) / n,
             "flops": float(np.mean([e["flops"] for e in group]))}
            for group in groups.values() if len(group) == n]


def compute_to_reach(models: dict[str, list[dict[str, Any]]], *, base: str | None,
                     retain_metric: str | None, max_retain_drop: float,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Per label: the cost curve (`flops`, `value`) over every family (utility limit on), the
    target (half of the base model's recovery) and the FLOPs to reach it with an interval."""
    rng = np.random.default_rng([seed, 31])
    direction = next(iter(models.values()))[0].get("direction") or "max"
    s = _sign(direction)
    p_base = None
    if base in models:
        finals = [(r.get("summary") or {}).get("final") for r in models[base]]
        p_base = None if any(v is None for v in finals) else float(np.mean(finals))
    out = {}
    for label, seeds in models.items():
        res = seeds[0]
        evals = _pooled_evaluations(seeds, retain_metric, max_retain_drop)
        before = _before(seeds)[0]
        entry: dict[str, Any] = {"flops": [], "value": [], "target": None,
                                 "flops_to_target": None, "lower": None, "upper": None,
                                 "reached": None}
        if not evals or not any("cost" in r for r in res.get("runs") or []):
            out[label] = entry  # nothing attacked, or results written before costs
            continue
        flops, curve = cost_curve(evals, direction)
        entry["flops"], entry["value"] = flops.tolist(), curve[0].tolist()
        if p_base is not None and before is not None and label != base \
                and s * (p_base - before) > 0:  # else nothing to recover: no target
            target = before + (p_base - before) / 2
            entry["target"] = target
            z = rng.standard_normal((samples, len(evals)))
            resampled = np.asarray([e["value"] for e in evals]) + \
                np.asarray([e["stderr"] for e in evals]) * z
            _, curves = cost_curve(evals, direction, resampled)
            reached = s * (curves - target) >= 0
            first = np.where(reached.any(1), flops[np.argmax(reached, 1)], np.inf)
            hit = s * (curve[0] - target) >= 0
            entry["reached"] = bool(hit.any())
            entry["flops_to_target"] = float(flops[np.argmax(hit)]) if hit.any() else None
            # no interpolation: a bound is a resample's value, or infinite (never reached)
            low, high = (float(np.quantile(first, q, method="inverted_cdf"))
                         for q in (0.025, 0.975))
            low = low if math.isfinite(low) else None
            entry["lower"] = low
            entry["upper"] = high if math.isfinite(high) else None  # None: not reached
        out[label] = entry
    return out
