"""Bootstrap intervals of means: the textbook loop, containment, shrinkage, coverage, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from paramsal.analyses.bootstrap import bootstrap_mean_ci
from paramsal.errors import InputError


def _loop_reference(values: np.ndarray, resamples: int, level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One resample at a time, the same draws: mean of the drawn rows, then the percentiles."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = np.stack([values[rows].mean(0) for rows in draws])
    tail = (1 - level) / 2
    return np.quantile(means, tail, axis=0), np.quantile(means, 1 - tail, axis=0)


def test_vectorized_equals_the_loop_on_the_same_draws():
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(size=150), rng.exponential(size=150), rng.random(150) < 0.2])
    ci = bootstrap_mean_ci(values, num_resamples=500, level=0.9, seed=3)
    low, high = _loop_reference(values, 500, 0.9, 3)
    np.testing.assert_allclose(ci.low, low, rtol=1e-12)
    np.testing.assert_allclose(ci.high, high, rtol=1e-12)
    np.testing.assert_allclose(ci.mean, values.mean(0), rtol=1e-12)


def test_intervals_contain_the_mean_and_shrink_with_more_samples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (25, 100, 400, 1600):
        values = np.column_stack([rng.normal(1.0, 2.0, n), rng.random(n) < 0.3])
        ci = bootstrap_mean_ci(values, seed=0)
        assert (ci.low <= ci.mean).all() and (ci.mean <= ci.high).all()
        widths.append(ci.high - ci.low)
    widths = np.array(widths)
    assert (np.diff(widths, axis=0) < 0).all()
    # the width falls like 1/sqrt(n): four times the samples, about half the width
    np.testing.assert_allclose(widths[:-1] / widths[1:], 2.0, rtol=0.35)


def test_coverage_of_a_known_mean_is_near_the_level():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        ci = bootstrap_mean_ci(rng.normal(0.5, 1.0, 60), num_resamples=400, seed=trial)
        hits += int(ci.low[0] <= 0.5 <= ci.high[0])
    assert 0.86 <= hits / 200 <= 0.99


def test_seeded_and_chunked_alike(monkeypatch):
    values = np.random.default_rng(3).normal(size=(80, 4))
    one = bootstrap_mean_ci(values, seed=7)
    np.testing.assert_array_equal(one.low, bootstrap_mean_ci(values, seed=7).low)
    assert not np.array_equal(one.low, bootstrap_mean_ci(values, seed=8).low)
    from paramsal.analyses import bootstrap

    monkeypatch.setattr(bootstrap, "_COUNTS_BUDGET", 80 * 7)  # 7 resamples per chunk
    chunked = bootstrap.bootstrap_mean_ci(values, seed=7)  # the same stream of draws, in pieces
    np.testing.assert_allclose(chunked.low, one.low, rtol=1e-12)
    np.testing.assert_allclose(chunked.high, one.high, rtol=1e-12)


def test_constant_columns_and_bad_input():
    ci = bootstrap_mean_ci(np.zeros((30, 2)))
    assert (ci.low == 0).all() and (ci.high == 0).all()
    with pytest.raises(InputError, match="n >= 1"):
        bootstrap_mean_ci(np.zeros((0, 3)))
    with pytest.raises(InputError, match="NaN"):
        bootstrap_mean_ci(np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="level"):
        bootstrap_mean_ci(np.ones(3), level=1.5)
