"""Uncertainty of the numbers undo reports: pure functions on plain numbers (numpy only).

- A proportion over n items (exact-match or multiple-choice accuracy): its standard error as
  lm-evaluation-harness reports `acc_stderr` (the sample standard deviation of the 0/1 outcomes
  over sqrt(n)) and the Wilson score interval at 95% (`wilson_interval`), which keeps its
  coverage near 95% for small n and for accuracies near 0 or 1, where the normal interval does
  not.
- A token-weighted mean (a loss: sum of per-item losses over the sum of their token counts):
  the standard error of that ratio estimator (`ratio_stderr`).
- Bootstrap: percentile intervals of any statistic over resampled units (`percentile`,
  `resample_counts`), seeded, so that a report is repeatable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000
UNCERTAINTY = ("_stderr", "_lower", "_upper")  # suffixes of a metric's uncertainty


def is_uncertainty(name: str) -> bool:
    """Whether metric `name` (`SET.METRIC_lower`, ...) is another metric's standard error or
    interval bound rather than a measurement of its own."""
    return name.endswith(UNCERTAINTY)


def proportion_stderr(outcomes: Sequence[float]) -> float:
    """Standard error of a mean of per-item outcomes: sample standard deviation (n - 1) over
    sqrt(n), lm-eval's `mean_stderr` (NaN with fewer than 2 items)."""
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size < 2:
        return math.nan
    return float(values.std(ddof=1) / math.sqrt(values.size))


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n`:

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    (NaN, NaN) for n = 0. The bounds are exactly 0 at no success and exactly 1 at n of n
    (where rounding would leave 3.5e-18 and exclude the point), and always contain p."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lower = 0.0 if successes <= 0 else min(p, max(0.0, centre - half))
    upper = 1.0 if successes >= n else max(p, min(1.0, centre + half))
    return lower, upper


def ratio_stderr(sums: Sequence[float], counts: Sequence[float]) -> float:
    """Standard error of R = sum(sums) / sum(counts) (a token-weighted mean loss), by the
    delta method over items: sqrt(sum_i (s_i - R c_i)^2 / (n (n - 1))) / mean(c)."""
    s = np.asarray(sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    n = s.size
    if n < 2 or c.sum() <= 0:
        return math.nan
    r = s.sum() / c.sum()
    return float(math.sqrt(((s - r * c) ** 2).sum() / (n * (n - 1))) / c.mean())


def resample_counts(n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """`[samples, n]`: how often each of n units is drawn in each bootstrap resample (n draws
    with replacement), so that a resampled mean of `v` is `counts @ v / n`."""
    if n == 0:
        return np.zeros((samples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def percentile(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap `samples` (non-finite ones dropped)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def column_percentiles(samples: np.ndarray, level: float = LEVEL
                       ) -> tuple[list[float], list[float]]:
    """`percentile` of every column of `samples` (`[samples, points]`) at once: the lower
    and the upper bounds, a list each."""
    if samples.shape[1] == 0:
        return [], []
    tail = (1 - level) / 2 * 100
    finite = np.isfinite(samples)
    if finite.all():
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    else:
        with warnings.catch_warnings():  # a column without a finite value: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(np.where(finite, samples, np.nan),
                                         [tail, 100 - tail], axis=0)
    return [float(x) for x in low], [float(x) for x in high]


def ratio_value(num: np.ndarray, den: np.ndarray, kind: str) -> np.ndarray:
    """A metric from its per-item sums: `num / den` (an accuracy, a mean loss), or
    exp(num / den) for kind `ppl`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = num / den
    return np.exp(np.minimum(value, 700)) if kind == "ppl" else value


def curve_from_items(points: Sequence[dict], metric: str,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """The values of curve `points` from the per-item values each keeps
    (`{"items": {"num": [...], "den": [...]}}`), under item resample `weights`
    (`[samples, n]`, the same items at every point): `[samples, points]` (`[1, points]`
    without weights)."""
    kind = metric.rpartition(".")[2]
    out = []
    for point in points:
        num = np.asarray(point["items"]["num"], dtype=np.float64)
        den = np.asarray(point["items"]["den"], dtype=np.float64)
        w = weights if weights is not None else np.ones((1, len(num)))
        out.append(ratio_value(w @ num, w @ den, kind))
    return np.stack(out, 1)


def trapezoid_mean(steps: Sequence[float], curves: np.ndarray) -> np.ndarray:
    """The area under each curve of `curves` (`[samples, points]`) over `steps`, divided by
    the span of the steps: the AUC undo reports (the last value for a single point)."""
    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) < 2 or steps[-1] == steps[0]:
        return curves[:, -1]
    widths = np.diff(steps)
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * widths).sum(1) / (steps[-1] - steps[0])
