"""Streaming statistics equal a float64 two-pass computation, whatever the chunking or merge order."""

from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramsal import InputError, SaliencyStats, load_reference_stats


def two_pass(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = values.sum(0) / len(values)
    var = ((values - mean) ** 2).sum(0) / (len(values) - 1)
    return mean, np.sqrt(var)


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(values, sorted(set(c % len(values) for c in cuts)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), f=st.integers(1, 5), cuts=st.lists(st.integers(0, 1000), max_size=8),
       seed=st.integers(0, 2**31), merge_order=st.randoms(use_true_random=False))
def test_chunked_updates_and_merges_equal_two_pass(n, f, cuts, seed, merge_order):
    values = np.random.default_rng(seed).normal(3.0, 2.0, size=(n, f))
    want_mean, want_std = two_pass(values)

    streamed = SaliencyStats(f)
    for chunk in split(values, cuts):
        streamed.update(chunk)
    parts = [SaliencyStats(f).update(chunk) for chunk in split(values, cuts)]
    merge_order.shuffle(parts)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)

    for stats in (streamed, merged):
        assert stats.count == n
        np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(stats.std, want_std, rtol=1e-12, atol=0)


def test_large_offset_tiny_variance_keeps_its_digits():
    rng = np.random.default_rng(7)
    values = 1e6 + rng.normal(0.0, 1e-3, size=(100_000, 3))
    want_mean, want_std = two_pass(values)
    stats = SaliencyStats(3)
    for chunk in np.array_split(values, 37):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, want_std, rtol=1e-8)
    naive_var = (values**2).mean(0) - values.mean(0) ** 2
    assert np.abs(np.sqrt(np.abs(naive_var)) - want_std).max() > 1e-2 * want_std.max()  # the trap avoided


def test_merge_leaves_operands_unchanged_and_update_accepts_torch():
    a = SaliencyStats(2).update(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    b = SaliencyStats(2).update(np.array([[5.0, 1.0]]))
    merged = a.merge(b)
    assert (a.count, b.count, merged.count) == (2, 1, 3)
    np.testing.assert_allclose(merged.mean, [3.0, 8 / 3])
    np.testing.assert_allclose(a.mean, [2.0, 3.5])


def test_std_floor_standardize_and_errors():
    stats = SaliencyStats(2).update(np.array([[1.0, 4.0], [3.0, 4.0], [5.0, 4.0]]))
    np.testing.assert_array_equal(stats.std, [2.0, 1.0])  # constant unit: std 0 -> 1
    z = stats.standardize(torch.tensor([[5.0, 6.0]], dtype=torch.float64))
    assert z.dtype == torch.float64
    np.testing.assert_allclose(z.numpy(), [[1.0, 2.0]])
    with pytest.raises(InputError, match="at least 2 samples"):
        _ = SaliencyStats(2).update(np.ones((1, 2))).std
    with pytest.raises(InputError, match="do not fit"):
        stats.update(np.ones((2, 3)))
    with pytest.raises(InputError, match="cannot merge"):
        stats.merge(SaliencyStats(3))


def test_save_load_round_trip(tmp_path):
    stats = SaliencyStats(4, "mean_abs").update(np.random.default_rng(0).random((10, 4)))
    stats.save(tmp_path / "stats.parquet")
    back = SaliencyStats.load(tmp_path / "stats.parquet")
    assert (back.count, back.aggregation) == (10, "mean_abs")
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.m2, stats.m2)
    assert not list(tmp_path.glob(".*tmp*"))


def test_reference_stats_load_by_name_and_path():
    stats = load_reference_stats("resnet50")
    path = (resources.files("paramsal.data")
            / "authors_imagenet_stats/ImageNet_val_saliency_stat_resnet50_filter_wise.pth")
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    assert load_reference_stats(str(path)).count == 50_000
    assert stats.num_units == 26_560 and stats.count == 50_000 and stats.aggregation == "abs_mean"
    np.testing.assert_allclose(stats.mean, raw["mean"].double().numpy())
    raw_std = raw["std"].double().numpy()
    np.testing.assert_allclose(stats.std[raw_std > 1e-14], raw_std[raw_std > 1e-14], rtol=1e-12)
    assert (stats.std[raw_std <= 1e-14] == 1.0).all() and (raw_std <= 1e-14).sum() == 280
    with pytest.raises(InputError, match="no reference statistics"):
        load_reference_stats("resnet51")
