"""The uncertainty formulas (`undo_cli.stats`) against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from undo_cli.stats import (
    Z95,
    column_percentiles,
    percentile,
    proportion_stderr,
    ratio_stderr,
    resample_counts,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (43, 50), (50, 50), (1, 1)])
def test_wilson_interval_matches_the_textbook_formula(k, n):
    # Wilson (1927): the p0 solving |p - p0| = z sqrt(p0 (1 - p0) / n), a quadratic in p0.
    p, z2 = k / n, Z95 ** 2
    a, b, c = 1 + z2 / n, -(2 * p + z2 / n), p * p
    root = math.sqrt(b * b - 4 * a * c)
    lower, upper = wilson_interval(k, n)
    assert lower == pytest.approx(max(0.0, (-b - root) / (2 * a)), abs=1e-12)
    assert upper == pytest.approx(min(1.0, (-b + root) / (2 * a)), abs=1e-12)
    assert lower <= p <= upper


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 12345])
def test_wilson_bounds_are_exactly_0_and_1_at_the_edges(n):
    # At 0 of n the textbook lower bound is 0, but rounding left 3.5e-18 at n = 100, so a
    # model answering nothing had an interval excluding its own 0.000 (issue 26, item 15).
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0
    for k in range(0, n + 1, max(1, n // 7)):
        lower, upper = wilson_interval(k, n)
        assert 0.0 <= lower <= k / n <= upper <= 1.0


def test_wilson_interval_of_nothing_is_nan():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_coverage_is_near_95_percent():
    # 2000 binomial draws at a true accuracy of 0.3 on 80 items: the interval holds it in
    # 93-97% of them (the normal interval's coverage drifts at small n; Wilson's does not).
    rng = np.random.default_rng(7)
    n, p = 80, 0.3
    hits = 0
    for k in rng.binomial(n, p, size=2000):
        lower, upper = wilson_interval(int(k), n)
        hits += lower <= p <= upper
    assert 0.93 <= hits / 2000 <= 0.97


def test_proportion_stderr_is_lm_evals_mean_stderr():
    outcomes = [1, 0, 1, 1, 0, 1, 1, 1]
    mean = sum(outcomes) / len(outcomes)
    sample_var = sum((x - mean) ** 2 for x in outcomes) / (len(outcomes) - 1)
    assert proportion_stderr(outcomes) == pytest.approx(math.sqrt(sample_var / len(outcomes)))
    assert math.isnan(proportion_stderr([1.0]))


def test_ratio_stderr_matches_the_delta_method_by_hand():
    sums, counts = [2.0, 3.5, 1.0, 4.0], [2, 3, 1, 5]
    r = sum(sums) / sum(counts)
    n = len(sums)
    mean_count = sum(counts) / n
    by_hand = math.sqrt(sum((s - r * c) ** 2 for s, c in zip(sums, counts))
                        / (n * (n - 1))) / mean_count
    assert ratio_stderr(sums, counts) == pytest.approx(by_hand)
    # Equal counts: the plain standard error of the per-item means.
    assert ratio_stderr([1.0, 2.0, 4.0], [1, 1, 1]) == pytest.approx(
        proportion_stderr([1.0, 2.0, 4.0]))


def test_resampled_means_match_a_loop_over_drawn_indices():
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    counts = resample_counts(len(values), 300, np.random.default_rng(3))
    assert counts.shape == (300, 6) and (counts.sum(1) == 6).all()
    # The same bootstrap by a loop: expand each row's counts into drawn indices.
    loop = [values[np.repeat(np.arange(6), row.astype(int))].mean() for row in counts]
    assert np.allclose(counts @ values / 6, loop)
    low, high = percentile(counts @ values / 6)
    assert low == pytest.approx(np.percentile(loop, 2.5))
    assert high == pytest.approx(np.percentile(loop, 97.5))


def test_percentile_ignores_non_finite_samples():
    assert percentile(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)
    assert all(math.isnan(x) for x in percentile(np.array([np.nan])))


def test_column_percentiles_are_the_percentile_of_each_column():
    rng = np.random.default_rng(3)
    samples = rng.random((300, 5))
    samples[:40, 1] = np.nan
    samples[7, 2] = np.inf
    samples[:, 3] = np.nan  # no finite value: NaN bounds
    lows, highs = column_percentiles(samples)
    for j in range(5):
        expected = percentile(samples[:, j])
        assert np.allclose([lows[j], highs[j]], expected, equal_nan=True, rtol=0, atol=1e-15)
    assert column_percentiles(np.zeros((4, 0))) == ([], [])
