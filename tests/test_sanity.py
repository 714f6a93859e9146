"""Cascading randomization sanity check: ranks, layer order, stages, the caller's model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_input_saliency import SmoothCNN, _model_and_stats

import paramsal
from paramsal.engine.analyses.input_saliency import InputSaliency
from paramsal.engine.analyses.sanity import CascadingRandomization, rank_data, randomizable_layers, spearman


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
    model, stats = _model_and_stats()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    explainer = InputSaliency(model, stats, top=2)
    rng_state = torch.get_rng_state()
    result = CascadingRandomization(explainer, seed=1).evaluate(x, y, sample_ids=[5, 6, 7])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.correlations.shape == (3, 4) and result.stages.tolist() == [1, 2, 3, 4]
    assert bool(np.all(np.abs(result.correlations) <= 1 + 1e-12))
    # Randomizing everything leaves little of the original map.
    assert result.mean[-1] < 0.9
    again = CascadingRandomization(explainer, stages=[2, 4], seed=1).evaluate(x, y, sample_ids=[5, 6, 7])
    np.testing.assert_allclose(again.correlations, result.correlations[:, [1, 3]], rtol=1e-9)
    path = tmp_path / "sanity.png"
    result.plot(path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(paramsal.InputError, match=r"outside 1\.\.4"):
        CascadingRandomization(explainer, stages=[0, 9])
