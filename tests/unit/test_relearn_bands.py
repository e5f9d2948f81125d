"""The worst case's bootstrap band (`undo_cli.relearn.bands`) against a direct loop."""

from __future__ import annotations

import numpy as np
import pytest

from undo_cli.relearn.bands import (
    Evaluation,
    item_values,
    worst_case_band,
)
from undo_cli.stats import curve_from_items, resample_counts, trapezoid_mean


def _runs(rng, configs=("a", "b"), seeds=(0,), steps=(0, 5, 10), n=12):
    out = []
    for key in configs:
        for seed in seeds:
            for step in steps:
                p = 0.2 + 0.05 * step + (0.1 if key == "b" else 0.0)
                out.append(Evaluation((key, False), seed, step,
                                      (rng.random(n) < p).astype(float), np.ones(n)))
    return out


def test_item_band_is_the_max_over_configurations_inside_each_resample():
    evaluations = _runs(np.random.default_rng(0))
    band = worst_case_band(evaluations, "forget.accuracy", "max", samples=500, seed=4)
    assert band["method"] == "bootstrap over items" and band["steps"] == [0, 5, 10]
    # The same resamples by hand: rebuild the generator as the function seeds it.
    weights = resample_counts(12, 500, np.random.default_rng([4, 20261129]))
    curves = np.zeros((500, 3))
    for j, step in enumerate((0, 5, 10)):
        per_config = [weights @ e.num / 12 for e in evaluations if e.step == step]
        curves[:, j] = np.max(per_config, axis=0)
    for j in range(3):
        assert band["lower"][j] == pytest.approx(np.percentile(curves[:, j], 2.5))
        assert band["upper"][j] == pytest.approx(np.percentile(curves[:, j], 97.5))
    aucs = ((curves[:, 0] + curves[:, 1]) / 2 * 5 + (curves[:, 1] + curves[:, 2]) / 2 * 5) / 10
    assert band["auc"] == pytest.approx((np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)))
    assert band["final"][0] <= band["final"][1]


@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_a_band_at_the_edge_is_exactly_the_edge(value, seeds):
    # Every item wrong (or right) at every step: every bound, the AUC's and the final point's
    # included, is exactly 0 (or 1), over items and over seeds, with uneven steps.
    evaluations = [Evaluation((k, False), seed, step, np.full(9, value), np.ones(9))
                   for k in "ab" for seed in seeds for step in (0, 3, 10, 17)]
    band = worst_case_band(evaluations, "forget.accuracy", "max", samples=300)
    assert band["lower"] == band["upper"] == [value] * 4
    assert band["auc"] == band["final"] == (value, value)


def test_seed_band_resamples_seeds_and_takes_the_worst_of_the_seed_means():
    evaluations = _runs(np.random.default_rng(1), seeds=(0, 1, 2))
    band = worst_case_band(evaluations, "forget.accuracy", "max", samples=400, seed=0)
    assert band["method"] == "bootstrap over seeds"
    draws = np.random.default_rng([0, 20261129]).integers(0, 3, size=(400, 3))
    final = []
    for row in draws:
        means = [np.mean([next(e.num.mean() for e in evaluations
                               if e.key == (key, False) and e.seed == s and e.step == 10)
                          for s in row]) for key in ("a", "b")]
        final.append(max(means))
    assert band["final"] == pytest.approx((np.percentile(final, 2.5),
                                           np.percentile(final, 97.5)))


def test_loss_band_is_a_token_weighted_ratio_and_min_for_a_loss():
    rng = np.random.default_rng(2)
    evaluations = [Evaluation((k, False), 0, s, rng.random(6) * 4, rng.integers(1, 5, 6) * 1.0)
                   for k in "ab" for s in (0, 4)]
    band = worst_case_band(evaluations, "forget.loss", "min", samples=200)
    weights = resample_counts(6, 200, np.random.default_rng([0, 20261129]))
    final = np.min([weights @ e.num / (weights @ e.den) for e in evaluations if e.step == 4],
                   axis=0)
    assert band["final"] == pytest.approx((np.percentile(final, 2.5),
                                           np.percentile(final, 97.5)))


def test_item_values_and_curves_from_stored_items():
    items = {"forget": {"accuracy": [1.0, 0.0, 1.0], "loss": ([2.0, 1.0, 3.0], [2, 1, 1])}}
    num, den = item_values(items, "forget.accuracy")
    assert num.tolist() == [1.0, 0.0, 1.0] and den.tolist() == [1.0, 1.0, 1.0]
    num, den = item_values(items, "forget.ppl")
    assert den.tolist() == [2, 1, 1]
    assert item_values(items, "retain.accuracy") is None
    points = [{"items": {"num": [0.0, 1.0], "den": [1, 1]}},
              {"items": {"num": [1.0, 1.0], "den": [1, 1]}}]
    curve = curve_from_items(points, "forget.accuracy")
    assert curve.tolist() == [[0.5, 1.0]]
    assert trapezoid_mean([0, 10], curve).tolist() == [0.75]
    ppl = curve_from_items([{"items": {"num": [2.0, 4.0], "den": [1, 2]}}], "f.ppl")
    assert ppl[0, 0] == pytest.approx(np.exp(2.0))
