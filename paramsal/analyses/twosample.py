"""Two-sample statistics of many columns at once: a standardized shift with its bootstrap interval, a rank test.

The numbers behind :class:`~paramsal.analyses.comparison.Compare`, for columns
(units) of two samples A and B held in memory a block of columns at a time:

* moments: mean and standard deviation (n-1) in float64, two-pass, a
  standard deviation at or below :data:`~paramsal.ranking.stats.STD_FLOOR`
  replaced by 1, as a run's statistics do;
* the shift ``d = (mean_B - mean_A) / std_A`` and its percentile bootstrap
  interval: A's and B's rows are resampled independently, and each resample
  recomputes both means and A's standard deviation, by matrix products of
  bootstrap counts with the rows (:class:`ResampleCounts`);
* the Mann-Whitney statistic as an AUC, ``P(b > a) + P(b = a) / 2``, its
  two-sided p-value (normal approximation with tie and continuity
  corrections, as ``scipy.stats.mannwhitneyu(method="asymptotic")``), and
  Benjamini-Hochberg q-values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from paramsal.ranking.stats import STD_FLOOR

#: Rows whose bootstrap counts are drawn together, from one generator: a fixed size, so that the resamples (and
#: every number drawn from them) do not depend on the memory budget or on how the columns are blocked.
RESAMPLE_CHUNK = 128


def unit_moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of ``values [n, u]`` (n >= 2), float64, the deviation floored.

    Two passes in float64, a chunk of rows at a time, so that no float64 copy
    of the whole block is made.
    """
    n = len(values)
    mean = values.sum(axis=0, dtype=np.float64) / n
    m2 = np.zeros_like(mean)
    for start in range(0, n, RESAMPLE_CHUNK):
        m2 += np.square(values[start:start + RESAMPLE_CHUNK] - mean).sum(axis=0)
    return mean, floored_std(m2 / (n - 1))


def floored_std(variance: np.ndarray) -> np.ndarray:
    """``sqrt(variance)``, values at or below the floor (and rounding's negative variances) replaced by 1."""
    std = np.sqrt(np.maximum(variance, 0.0))
    return np.where(std <= STD_FLOOR, 1.0, std)


class ResampleCounts:
    """How often each of n rows is drawn in each of R bootstrap resamples (each resample draws n rows with
    replacement), produced a chunk of :data:`RESAMPLE_CHUNK` rows at a time.

    A resample's draws are split among the chunks by one multinomial draw
    (``[R, chunks]``, from the generator of ``(seed, stream)``); chunk j then
    places its share of draws uniformly on its rows, with the generator of
    ``(seed, stream, j)``. Together this is exactly n uniform draws with
    replacement, and any chunk can be made again alone, identically.

    Args:
        n: rows.
        num_resamples: R.
        seed: seeds every generator.
        stream: tells independent resamplings with one seed apart (A is 0, B is 1).
    """

    def __init__(self, n: int, num_resamples: int, seed: int, stream: int):
        self.n, self.num_resamples, self.seed, self.stream = n, num_resamples, seed, stream
        self.bounds = np.r_[np.arange(0, n, RESAMPLE_CHUNK), n]
        sizes = np.diff(self.bounds)
        self.shares = np.random.default_rng([seed, stream]).multinomial(n, sizes / n, size=num_resamples)

    def chunks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """``(rows, counts [R, len(rows)] float64)`` for each chunk of rows, in order."""
        for j, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            yield slice(int(start), int(stop)), self._chunk(j, int(stop - start))

    def _chunk(self, j: int, rows: int) -> np.ndarray:
        shares = self.shares[:, j]
        draws = np.random.default_rng([self.seed, self.stream, j]).integers(0, rows, size=int(shares.sum()))
        owner = np.repeat(np.arange(self.num_resamples), shares)
        counts = np.bincount(owner * rows + draws, minlength=self.num_resamples * rows)
        return counts.reshape(self.num_resamples, rows).astype(np.float64)

    def dense(self) -> np.ndarray:
        """``[R, n]`` all the counts at once (for checks on small n; each row sums to n)."""
        return np.concatenate([counts for _, counts in self.chunks()], axis=1)


def bootstrap_shifts(a: np.ndarray, b: np.ndarray, mean_a: np.ndarray, counts_a: ResampleCounts,
                     counts_b: ResampleCounts) -> np.ndarray:
    """The shift ``d`` of every column in every resample: ``[R, u]``.

    Per resample, ``d* = (mean*_B - mean*_A) / std*_A``, all three recomputed
    from the resampled rows. The rows are centred on A's mean first, so that
    the variance from first and second moments loses no digits (the means of
    the centred rows are of the order of the spread, not of the mean).

    Args:
        a: ``[n_a, u]`` A's values (n_a >= 2).
        b: ``[n_b, u]`` B's values.
        mean_a: ``[u]`` A's column means (float64).
        counts_a: A's resamples (n = n_a).
        counts_b: B's resamples (n = n_b), independent of A's.

    Memory: ``[R, u]`` three times, plus one chunk of counts and rows.
    """
    n_a, n_b = len(a), len(b)
    sum_a = np.zeros((counts_a.num_resamples, a.shape[1]))
    square_a = np.zeros_like(sum_a)
    sum_b = np.zeros_like(sum_a)
    for rows, counts in counts_a.chunks():
        centred = a[rows] - mean_a
        sum_a += counts @ centred
        square_a += counts @ np.square(centred)
    for rows, counts in counts_b.chunks():
        sum_b += counts @ (b[rows] - mean_a)
    shift_a, shift_b = sum_a / n_a, sum_b / n_b
    std_a = floored_std((square_a / n_a - np.square(shift_a)) * (n_a / (n_a - 1)))
    return (shift_b - shift_a) / std_a


def percentile_interval(resampled: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of each column of ``resampled [R, u]``."""
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail], axis=0)
    return low, high


@dataclass(frozen=True)
class RankTest:
    """Mann-Whitney of B against A per column.

    Attributes:
        auc: ``[u]`` ``U_B / (n_a n_b) = P(b > a) + P(b = a) / 2`` (0.5: no shift; above: B larger).
        p: ``[u]`` two-sided p-values.
    """

    auc: np.ndarray
    p: np.ndarray


def mann_whitney(a: np.ndarray, b: np.ndarray) -> RankTest:
    """Mann-Whitney U of each column of ``b [n_b, u]`` against the same column of ``a [n_a, u]``.

    U counts the pairs (a, b) with b > a, ties as a half. The p-value is the
    normal approximation's, with the variance corrected for ties in the
    pooled column and a continuity correction of 1/2; a column constant
    across both samples has p = 1.
    """
    n_a, n_b = len(a), len(b)
    u = np.empty(a.shape[1])
    ties = np.empty(a.shape[1])
    for k in range(a.shape[1]):
        u[k], ties[k] = _u_and_ties(a[:, k], b[:, k])
    n = n_a + n_b
    sigma = np.sqrt(n_a * n_b / 12 * ((n + 1) - ties / (n * (n - 1))))
    excess = np.maximum(u, n_a * n_b - u) - n_a * n_b / 2 - 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, excess / sigma, -np.inf)
    p = np.array([math.erfc(value / math.sqrt(2)) for value in z])  # 2 * P(N(0, 1) > z), exact far in the tail
    return RankTest(auc=u / (n_a * n_b), p=np.minimum(p, 1.0))


def _u_and_ties(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """U of ``b`` against ``a`` (1-D) and the tie term ``sum(t^3 - t)`` over the pooled values' tie groups."""
    ordered = np.sort(a)
    below = np.searchsorted(ordered, b, "left")
    equal = np.searchsorted(ordered, b, "right") - below
    pooled = np.sort(np.concatenate([ordered, b]))
    groups = np.diff(np.flatnonzero(np.r_[True, pooled[1:] != pooled[:-1], True])).astype(np.float64)
    return float(below.sum() + 0.5 * equal.sum()), float((groups ** 3 - groups).sum())


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values ``[m]``: the least FDR level at which each test is a discovery."""
    p = np.asarray(p, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.empty(m)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q
