"""Cascading randomization sanity check: ranks, layer order, stages, the caller's model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_input_saliency import SmoothCNN, _smooth_run

import paramsal
from paramsal.analyses.base import load_result
from paramsal.analyses.cascading_randomization import (
    CascadingRandomization,
    SanityResult,
    randomizable_layers,
    rank_data,
    spearman,
)


def test_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=50), rng.integers(0, 5, size=40).astype(float), np.zeros(3)):
        np.testing.assert_allclose(rank_data(values), stats.rankdata(values))
    a, b = rng.normal(size=60), rng.normal(size=60)
    b[:10] = 0.0  # ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert np.isnan(spearman(a, np.ones(60)))


def test_layers_in_model_order():
    assert randomizable_layers(SmoothCNN()) == ["conv1", "bn", "conv2", "fc"]


def test_cascade_identity_correlations_and_model_untouched(tmp_path):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    model, run, data = _smooth_run(tmp_path, inputs=x, labels=y, at=5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    result = CascadingRandomization(model, seed=1, k=2).evaluate(run, data, samples=[5, 6, 7])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.correlations.shape == (3, 4) and result.stages.tolist() == [1, 2, 3, 4]
    assert bool(np.all(np.abs(result.correlations) <= 1 + 1e-12))
    # Randomizing everything leaves little of the original map.
    assert result.mean[-1] < 0.9
    again = CascadingRandomization(model, stages=[2, 4], seed=1, k=2).evaluate(run, data, samples=[5, 6, 7])
    np.testing.assert_allclose(again.correlations, result.correlations[:, [1, 3]], rtol=1e-9)
    path = result.save(tmp_path / "out")["figure"]
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(paramsal.InputError, match=r"outside 1\.\.4"):
        CascadingRandomization(model, stages=[0, 9])


def test_plot_labels_layers_by_module_name_and_the_result_round_trips(tmp_path):
    model, run, data = _smooth_run(tmp_path)
    result = CascadingRandomization(model, k=2, stages=[1, 3, 4]).evaluate(run, data, samples=[0, 4])
    assert result.layers == ["conv1", "bn", "conv2", "fc"]
    assert result.summary["layer"].tolist() == ["fc", "bn", "conv1"]  # stage j: randomized down to layers[-j]
    axes = result.plot().axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["fc", "bn", "conv1"]
    assert result.correlations.shape == (2, 3) and result.sample_ids.tolist() == [0, 4]
    result.save(tmp_path / "out")
    loaded = load_result(tmp_path / "out", result.name)
    assert isinstance(loaded, SanityResult) and loaded.name == "sanity"
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(loaded.table, result.table)
    pd.testing.assert_frame_equal(loaded.summary, result.summary)
    np.testing.assert_array_equal(loaded.correlations, result.correlations)
