"""POT tails and scores (engine/tails.py, engine/scoring.py) against scipy and float64 numpy oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runs import make_run
from scipy import stats as sps
from torch.utils.data import Subset

import paramsal
from paramsal.errors import InputError, ParamsalWarning, RunCorruptError, RunLockedError
from paramsal.ranking.scoring import MIN_CLASS_SAMPLES, fit_reference_tails, reference_set, reference_tails
from paramsal.ranking.tails import MAX_SCORE, fit_gpd, fit_tails
from paramsal.rundir.layout import tails_file
from paramsal.rundir.lock import RunLock
from paramsal.rundir.ownership import MANIFEST
from paramsal.rundir.tails import store_tails
from paramsal.zoo import demo_dataset, demo_model

GPD_SHAPES = (-0.4, -0.2, 0.0, 0.1, 0.3, 0.6, 1.0, 2.0, 4.0)


def padded(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.zeros((max(map(len, columns)), len(columns)))
    for k, column in enumerate(columns):
        values[:len(column), k] = column
    return values, np.array([len(c) for c in columns])


def oracle_scores(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """scipy's POT scores: exact quantile, genpareto.fit per unit, exact empirical share below the threshold."""
    reference = reference.astype(np.float64)
    out = np.zeros(values.shape)
    for k in range(reference.shape[1]):
        column = reference[:, k]
        threshold = np.quantile(column, 0.9)
        excess = column[column > threshold] - threshold
        shape, _, scale = sps.genpareto.fit(excess, floc=0)
        for i, value in enumerate(values[:, k].astype(np.float64)):
            p = (np.mean(column >= value) if value <= threshold else
                 len(excess) / len(column) * sps.genpareto.sf(value - threshold, shape, 0, scale))
            out[i, k] = min(-np.log10(p), MAX_SCORE) if p > 0 else MAX_SCORE
    return out


def assert_matches_oracle(scores: np.ndarray, oracle: np.ndarray) -> None:
    """The issue's bar: Spearman >= 0.99 over units per sample, the top unit's score within 5%."""
    for ours, theirs in zip(scores, oracle):
        assert sps.spearmanr(ours, theirs).statistic >= 0.99
        top = int(np.argmax(theirs))
        assert ours[top] == pytest.approx(theirs[top], rel=0.05)


def heavy_tailed(n: int, units: int, seed: int = 0) -> np.ndarray:
    """Saliency-like values: positive, skewed, each unit on its own scale and tail."""
    rng = np.random.default_rng(seed)
    return (np.exp(rng.normal(size=(n, units)) * rng.uniform(0.3, 1.2, units)) * rng.uniform(1e-4, 1e-1, units)
            ).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the GPD fit


@pytest.mark.parametrize("count", [10, 60, 500])
def test_fit_is_at_least_as_likely_as_scipys_and_agrees_on_large_samples(count):
    rng = np.random.default_rng(count)
    columns = [sps.genpareto.rvs(c, scale=rng.uniform(1e-3, 10), size=count, random_state=rng)
               for c in GPD_SHAPES for _ in range(2)]
    xi, beta, loglik = fit_gpd(*padded(columns))
    for k, column in enumerate(columns):
        shape, _, scale = sps.genpareto.fit(column, floc=0)
        if shape <= -1:  # scipy wanders where the likelihood is unbounded; ours stays at the documented -1
            assert xi[k] >= -1.0
            continue
        theirs = sps.genpareto.logpdf(column, shape, 0, scale).sum()
        ours = sps.genpareto.logpdf(column, xi[k], 0, beta[k]).sum()
        assert ours == pytest.approx(loglik[k], rel=1e-9, abs=1e-9)
        assert ours >= theirs - 1e-7 * abs(theirs) - 1e-9
        if count >= 500:
            assert xi[k] == pytest.approx(shape, abs=2e-3)
            assert beta[k] == pytest.approx(scale, rel=2e-3)


def test_fit_refuses_what_is_no_set_of_exceedances():
    with pytest.raises(InputError, match="counts"):
        fit_gpd(np.ones((3, 2)), np.array([3, 0]))
    with pytest.raises(InputError, match="non-negative"):
        fit_gpd(-np.ones((3, 1)), np.array([3]))


# ------------------------------------------------------------------------------------------------ tails of arrays


def test_threshold_is_the_exact_quantile_and_the_fallbacks_never_give_nan():
    rng = np.random.default_rng(1)
    reference = heavy_tailed(400, 6)
    reference[:, 0] = 0.25  # constant
    reference[:, 1] = np.where(np.arange(400) < 395, 0.0, rng.uniform(1, 2, 400))  # 5 exceedances
    tails = fit_tails(reference)
    np.testing.assert_array_equal(tails.threshold[0], np.quantile(reference.astype(np.float64), 0.9, axis=0))
    assert tails.exceedances[0, 1] == 5 and not tails.fitted[0, 1] and tails.fitted[0, 2:].all()
    values = np.concatenate([reference[:50], reference[:50] * 3, np.full((1, 6), 1e6, np.float32)])
    scores = tails.score(values)
    assert np.isfinite(scores).all() and (scores >= 0).all()
    assert (scores[:, 0] == 0).all()  # a constant unit carries no ranking information
    above = values[:, 1] > tails.threshold[0, 1]
    top = np.sort(reference[:, 1])[-5:]
    expected = -np.log10((1 + (top[None] >= values[above, 1:2]).sum(1)) / 401)
    np.testing.assert_allclose(scores[above, 1], expected, rtol=1e-6)
    assert scores[-1, 2:].min() > scores[:-1, 2:].max(0).min()


def test_scores_of_arrays_equal_the_scipy_oracle():
    reference = heavy_tailed(3000, 24, seed=2)
    queries = heavy_tailed(40, 24, seed=3) * np.random.default_rng(4).uniform(0.5, 4, (40, 24)).astype(np.float32)
    assert_matches_oracle(fit_tails(reference).score(queries), oracle_scores(reference, queries))


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """1,200 samples x 20 units in 4 layers, 3 classes, about 20% misclassified."""
    rng = np.random.default_rng(5)
    profiles = heavy_tailed(1200, 20, seed=6)
    targets = rng.integers(0, 3, 1200)
    preds = np.where(rng.random(1200) < 0.8, targets, (targets + 1) % 3)
    profiles[preds != targets] *= 2.5
    return make_run(tmp_path_factory.mktemp("tails") / "run", profiles, targets, preds, np.repeat(np.arange(4), 5),
                    part_rows=150), profiles, targets, preds


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """600 demo images (every fifth), 60 exceedances per unit."""
    data = Subset(demo_dataset("test"), range(0, 3000, 5))
    return paramsal.profile_dataset(demo_model(), data, tmp_path_factory.mktemp("demo") / "run", batch_size=100,
                                    progress=False)


def test_pot_scores_of_a_real_run_equal_the_scipy_oracle(demo_run):
    layers = [0, 1, 14]  # 48 units: the first two and the last layer
    columns = demo_run.unit_columns(layers)
    reference = demo_run.profiles(standardized=False)[:, columns]
    wrong = demo_run.sample_ids("misclassified")
    scores = demo_run.scores("pot", only=wrong, layers=layers)
    assert scores.shape == (len(wrong), len(columns)) and len(wrong) >= 20
    queries = demo_run.profiles(standardized=False, only=wrong)[:, columns]
    assert_matches_oracle(scores, oracle_scores(reference, queries))


def test_pot_scores_of_a_run_equal_the_oracle_for_each_reference(synthetic):
    run, profiles, targets, preds = synthetic
    wrong = np.flatnonzero(preds != targets)[:30]
    every, correct = np.ones(len(targets), bool), preds == targets
    for reference, groups in (("all", {-1: every}), ("correct", {-1: correct}),
                              ("class", {c: targets == c for c in range(3)})):
        scores = run.scores("pot", only=wrong, reference=reference)
        tails = reference_tails(reference_set(run, reference))
        for label, rows in groups.items():
            mine = wrong[rows[wrong]]
            assert_matches_oracle(scores[rows[wrong]], oracle_scores(profiles[rows], profiles[mine]))
            np.testing.assert_array_equal(tails.threshold[int(np.searchsorted(tails.groups, label))],
                                          np.quantile(profiles[rows].astype(np.float64), 0.9, axis=0))


def test_zscores_equal_float64_two_pass_statistics_of_each_reference(synthetic, tmp_path):
    run, profiles, targets, preds = synthetic
    assert np.array_equal(run.scores(), run.profiles())
    values = profiles.astype(np.float64)
    correct = preds == targets

    def z(rows, reference_rows):
        mean, std = values[reference_rows].mean(0), values[reference_rows].std(0, ddof=1)
        return (values[rows] - mean) / std

    np.testing.assert_allclose(run.scores(reference="correct"), z(slice(None), correct), rtol=1e-5, atol=1e-5)
    by_class = run.scores(reference="class")
    for label in range(3):
        np.testing.assert_allclose(by_class[targets == label], z(targets == label, targets == label), rtol=1e-5,
                                   atol=1e-5)
    other = make_run(tmp_path / "other", profiles[::-1] * 2, targets, preds, np.repeat(np.arange(4), 5))
    np.testing.assert_array_equal(run.scores(reference=other.path), run.profiles(stats=other))


def test_a_small_class_is_scored_against_all_samples_with_a_note(tmp_path):
    profiles = heavy_tailed(300, 8, seed=7)
    targets = np.where(np.arange(300) < MIN_CLASS_SAMPLES - 1, 2, np.arange(300) % 2)
    run = make_run(tmp_path / "run", profiles, targets, targets, np.arange(8))
    small = np.flatnonzero(targets == 2)
    with pytest.warns(ParamsalWarning, match=r"classes \[2\] have fewer"):
        by_class = run.scores("zscore", only=small, reference="class")
    np.testing.assert_array_equal(by_class, run.profiles(only=small))
    with pytest.warns(ParamsalWarning, match="fewer"):
        pot = run.scores("pot", only=small, reference="class")
    np.testing.assert_array_equal(pot, run.scores("pot", only=small))


def test_tails_are_stored_listed_verified_and_refitted_when_stale(synthetic, tmp_path):
    _, profiles, targets, preds = synthetic
    run = make_run(tmp_path / "run", profiles, targets, preds, np.repeat(np.arange(4), 5))
    first = run.scores("pot")
    assert tails_file("all") not in paramsal.open_run(run.path).manifest["files"]  # reading a score writes nothing
    store_tails(run)  # the one step that stores them (paramsal tails RUN)
    assert tails_file("all") in run.manifest["files"] and paramsal.verify_run(run.path) == []
    again = paramsal.open_run(run.path)
    np.testing.assert_array_equal(again.scores("pot"), first)  # read back, not refitted: equal bit for bit
    with open(run.path / tails_file("all"), "r+b") as file:
        file.seek(100)
        file.write(b"\0\1\2")
    with pytest.raises(RunCorruptError, match="tails/all.parquet"):
        paramsal.open_run(run.path).scores("pot")
    manifest = json.loads((run.path / MANIFEST).read_text())
    manifest["files"][tails_file("all")]["fitted_on"] = "0" * 64  # as if the run's statistics had changed since
    (run.path / MANIFEST).write_text(json.dumps(manifest))
    np.testing.assert_array_equal(paramsal.open_run(run.path).scores("pot"), first)  # stale: fitted in memory
    store_tails(paramsal.open_run(run.path))  # and stored again by the explicit step
    assert paramsal.verify_run(run.path) == []


def test_a_small_budget_fits_the_same_tails_in_blocks_of_units(synthetic):
    run = synthetic[0]
    whole = fit_reference_tails(reference_set(run, "class"), budget_mb=64)
    blocks = fit_reference_tails(reference_set(run, "class"), budget_mb=0)  # one unit per block
    for name in ("threshold", "xi", "beta", "bulk", "top", "count", "exceedances"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))


def test_tails_of_a_run_another_job_holds_are_scored_in_memory_and_not_stored(synthetic, tmp_path):
    _, profiles, targets, preds = synthetic
    run = make_run(tmp_path / "run", profiles, targets, preds, np.repeat(np.arange(4), 5))
    with RunLock(run.path):
        scores = run.scores("pot")
        with pytest.raises(RunLockedError, match="being written by another job"):
            store_tails(paramsal.open_run(run.path))
    assert tails_file("all") not in paramsal.open_run(run.path).manifest["files"]
    np.testing.assert_array_equal(scores, paramsal.open_run(run.path).scores("pot"))


def test_bad_methods_and_references_are_named(synthetic, tmp_path):
    run, profiles, targets, preds = synthetic
    other = make_run(tmp_path / "other", profiles[:, :12], targets, preds, np.repeat(np.arange(4), 3))
    with pytest.raises(InputError, match="other units than .*A has 20 units and B 12"):
        run.scores(reference=other.path)
    with pytest.raises(InputError, match="ranking"):
        run.scores("gumbel")
    with pytest.raises(InputError, match="reference"):
        run.scores(reference="validation")
