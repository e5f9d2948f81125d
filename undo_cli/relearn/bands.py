"""The uncertainty of an attack's worst case: a 95% bootstrap band around the curve, and the
per-item values `undo report` resamples when it pools seeds (pure numpy, no torch).

What is resampled (`worst_case_band`):

- one seed per configuration (`--seeds 1`): the evaluation items. Every evaluation of every
  run scores the same items, so one resample of the item indices is applied to all of them,
  the worst case (the best configuration at each step) is taken again, and the band is the
  2.5 and 97.5 percentiles over resamples;
- several seeds: the seeds (drawn with replacement, the same draw for every configuration);
  each configuration's value is the mean over the drawn seeds, then the worst case is taken.

Either way the band includes the selection of the worst configuration (the maximum over
configurations is taken inside every resample, not once). The AUC (the curve's trapezoid
mean) and the final value get the band of the same resamples.

A metric is a ratio of sums over items, `sum(num) / sum(den)`: accuracy (num 0/1 per item,
den 1), loss (each item's negative log-likelihood and its token count); `ppl` is exp(loss).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from undo_cli.stats import (
    BOOTSTRAP_SAMPLES,
    LEVEL,
    column_percentiles,
    percentile,
    ratio_value,
    resample_counts,
    trapezoid_mean,
)


@dataclass
class Evaluation:
    """One counted evaluation of one run: its configuration, seed, step, and per-item values
    of the forget metric (`num` / `den` per item)."""

    key: tuple
    seed: Any
    step: int
    num: np.ndarray
    den: np.ndarray
    static: bool = False


def item_values(items: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(num, den) per item of `metric` (`SET.accuracy`, `SET.loss`, `SET.ppl`, ...) from
    `evaluate_model`'s per-item results of its set, or None."""
    set_name, _, kind = metric.rpartition(".")
    per_set = items.get(set_name) or {}
    if kind in ("accuracy", "accuracy_norm") and kind in per_set:
        values = np.asarray(per_set[kind], dtype=np.float64)
        return values, np.ones_like(values)
    if kind in ("loss", "ppl") and "loss" in per_set:
        sums, counts = per_set["loss"]
        return np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    return None


def worst_case_band(evaluations: Sequence[Evaluation], metric: str, direction: str, *,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = LEVEL
                    ) -> dict[str, Any] | None:
    """The bootstrap band of the worst-case curve (module doc): `{"steps", "lower", "upper",
    "auc": (lo, hi), "final": (lo, hi), "method", "samples"}`, or None without per-item data."""
    if not evaluations:
        return None
    kind = metric.rpartition(".")[2]
    rng = np.random.default_rng([seed, 20261129])
    steps = sorted({e.step for e in evaluations if not e.static} | {0})
    seeds = sorted({e.seed for e in evaluations if not e.static and e.seed is not None},
                   key=str)
    keys = list(dict.fromkeys(e.key for e in evaluations))
    pick = np.argmax if direction == "max" else np.argmin
    curves = np.full((samples, len(steps)), np.nan)
    if len(seeds) > 1:
        method = "bootstrap over seeds"
        draws = rng.integers(0, len(seeds), size=(samples, len(seeds)))
        for j, step in enumerate(steps):
            per_key = []
            for key in keys:
                values = np.array([_value_at(evaluations, key, s, step, kind) for s in seeds])
                with warnings.catch_warnings():  # a configuration without a value: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_key.append(np.nanmean(values[draws], axis=1))
            curves[:, j] = _best(np.stack(per_key, 1), pick)
    else:
        method = "bootstrap over items"
        n = len(evaluations[0].num)
        weights = resample_counts(n, samples, rng)  # the same items for every evaluation
        for j, step in enumerate(steps):
            per_key = []
            for key in keys:
                hit = [e for e in evaluations if e.key == key and (e.static or e.step == step)]
                if not hit or len(hit[0].num) != n:
                    continue
                e = hit[0]
                per_key.append(ratio_value(weights @ e.num, weights @ e.den, kind))
            if per_key:
                curves[:, j] = _best(np.stack(per_key, 1), pick)
    lower, upper = column_percentiles(curves, level)
    aucs = trapezoid_mean(steps, curves)
    return {"steps": steps, "lower": lower, "upper": upper,
            "auc": percentile(aucs, level), "final": percentile(curves[:, -1], level),
            "method": method, "samples": samples, "level": level}


def _value_at(evaluations: Sequence[Evaluation], key: tuple, seed: Any, step: int,
              kind: str) -> float:
    """The metric of configuration `key`, seed `seed`, at `step` (a static attack's at any
    step; one without a seed serves every seed); NaN if there is none."""
    for e in evaluations:
        if e.key == key and (e.static or e.step == step) and e.seed in (seed, None):
            return float(ratio_value(e.num.sum(keepdims=True), e.den.sum(keepdims=True), kind)[0])
    return math.nan


def _best(values: np.ndarray, pick) -> np.ndarray:
    """Per row, the best finite value (NaN where a row has none)."""
    filled = np.where(np.isfinite(values), values,
                      -np.inf if pick is np.argmax else np.inf)
    best = filled[np.arange(len(filled)), pick(filled, axis=1)]
    return np.where(np.isfinite(best), best, np.nan)


def point_items(evaluations: Sequence[Evaluation], key: tuple, step: int
                ) -> dict[str, list[float]] | None:
    """The per-item values of configuration `key` at `step` (seed means), as results.json
    keeps them with each worst-case point for `undo report`'s item bootstrap."""
    hits = [e for e in evaluations if e.key == key and (e.static or e.step == step)]
    if not hits or len({len(e.num) for e in hits}) != 1:
        return None
    num = np.mean([e.num for e in hits], axis=0)
    den = np.mean([e.den for e in hits], axis=0)
    return {"num": [round(float(x), 6) for x in num], "den": [round(float(x), 6) for x in den]}
