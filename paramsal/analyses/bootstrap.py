"""Percentile bootstrap confidence intervals for means, vectorized over many columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramsal.errors import InputError

#: Elements of the ``[resamples, n]`` count matrix built at once (bounds memory to ~256 MB).
_COUNTS_BUDGET = 1 << 25


@dataclass(frozen=True)
class MeanCI:
    """Means of columns with their bootstrap interval.

    Attributes:
        mean: ``[m]`` the column means.
        low: ``[m]`` lower ends of the intervals.
        high: ``[m]`` upper ends.
        level: the confidence level, e.g. 0.95.
        num_resamples: bootstrap resamples drawn.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    num_resamples: int


def bootstrap_mean_ci(values: np.ndarray, num_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> MeanCI:
    """Percentile bootstrap intervals of the mean of every column, with shared (paired) resamples.

    Each resample draws n rows with replacement; the same rows serve every
    column, so columns measured on the same samples (one per selection and k)
    are resampled together. A resample's means are its row counts times the
    values, one matrix product for all columns.

    Args:
        values: ``[n]`` or ``[n, m]`` finite numbers; rows are the samples.
        num_resamples: B, the number of resamples.
        level: confidence level; the interval runs between the
            ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the B
            resampled means.
        seed: seeds the resampling (same seed, same intervals).

    Returns:
        Means and interval ends, each ``[m]`` (``[1]`` for 1-D input).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise InputError(f"bootstrap needs values [n, m] with n >= 1, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError("bootstrap values contain NaN or inf")
    if num_resamples < 1 or not 0 < level < 1:
        raise InputError(f"bootstrap needs num_resamples >= 1 and 0 < level < 1, got {num_resamples}, {level}")
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty((num_resamples, values.shape[1]))
    step = max(1, _COUNTS_BUDGET // n)
    for start in range(0, num_resamples, step):
        stop = min(start + step, num_resamples)
        means[start:stop] = _resampled_counts(rng, stop - start, n) @ values / n
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)
    return MeanCI(mean=values.mean(0), low=low, high=high, level=level, num_resamples=num_resamples)


def _resampled_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """``[resamples, n]``: how often each row was drawn in each resample (rows sum to n)."""
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (draws + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)
