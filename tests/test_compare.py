"""Comparing two runs: each number against a direct computation, the rule for "moved" on known answers, the memory
budget, the refusals, and the demo's shifted copies end to end."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import scipy.stats
import torch
from runs import make_run
from torch.utils.data import Subset

import paramsal
from paramsal import InputError, ParamsalWarning
from paramsal.analyses.base import load_result
from paramsal.analyses.comparison import Compare, compare, plan_blocks
from paramsal.analyses.twosample import ResampleCounts, bh_qvalues, mann_whitney
from paramsal.cli import main
from paramsal.rundir.manifest import Manifest, read_manifest, write_manifest
from paramsal.zoo.shifts import add_noise, gaussian_blur, split_shifts
from paramsal.zoo.specs import is_builtin_spec, load_data

UNITS = 24
LAYERS = np.repeat([0, 1, 2], UNITS // 3)


def draw(rng: np.random.Generator, n: int, units: int = UNITS) -> np.ndarray:
    """Positive, skewed profiles like saliencies: gamma with mean 1 and std 0.5."""
    return rng.gamma(4.0, 0.25, size=(n, units)).astype(np.float32)


def write(root, profiles, layers=LAYERS, preds=None):
    targets = np.zeros(len(profiles), np.int64)
    return make_run(root, profiles, targets, targets if preds is None else preds, layers)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two independent draws of one distribution; in B, units 3, 10 and 20 shifted by +1, -0.8 and +0.6 std."""
    rng = np.random.default_rng(7)
    a, b = draw(rng, 400), draw(rng, 360)
    shifts = {3: 1.0, 10: -0.8, 20: 0.6}
    for unit, d in shifts.items():
        b[:, unit] += np.float32(d * 0.5)
    root = tmp_path_factory.mktemp("planted")
    return write(root / "a", a), write(root / "b", b), a, b, shifts


def test_means_stds_and_shifts_are_numpys_float64(planted):
    run_a, run_b, a, b, _ = planted
    table = Compare(num_resamples=50).evaluate(run_a, run_b).table
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(table["mean_a"], a64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(table["std_a"], a64.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(table["mean_b"], b64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(table["d"], (b64.mean(0) - a64.mean(0)) / a64.std(0, ddof=1), rtol=1e-10, atol=1e-13)
    assert table["unit_id"].tolist() == list(range(UNITS)) and table["layer"].tolist() == LAYERS.tolist()


def test_auc_p_and_q_are_scipys(tmp_path):
    rng = np.random.default_rng(3)
    a, b = draw(rng, 90), draw(rng, 70)
    a[:, :6], b[:, :6] = np.round(a[:, :6], 1), np.round(b[:, :6] + 0.2, 1)  # ties within and across the runs
    a[:, 6], b[:, 6] = 0.0, 0.0  # a dead unit: constant in both, its std floored to 1
    a[:, 7], b[:, 7] = 0.0, 0.25  # constant in each run, different between them
    table = compare(write(tmp_path / "a", a), write(tmp_path / "b", b), num_resamples=50).table
    for unit in range(UNITS):
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = scipy.stats.mannwhitneyu(b[:, unit].astype(np.float64), a[:, unit].astype(np.float64),
                                                method="asymptotic")
        assert table["auc"][unit] == pytest.approx(expected.statistic / (len(a) * len(b)), abs=1e-15)
        assert table["p"][unit] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300), unit
    np.testing.assert_allclose(table["q"], scipy.stats.false_discovery_control(table["p"], method="bh"), rtol=1e-12)
    assert table["std_a"][6] == 1.0 and table["d"][6] == 0.0 and table["p"][6] == 1.0
    assert table["auc"][7] == 1.0 and table["d"][7] == pytest.approx(0.25)


def test_bootstrap_interval_is_a_direct_resampling(tmp_path):
    """The same resamples, but each resample's d computed by weighted moments instead of blocked products."""
    rng = np.random.default_rng(5)
    a, b = draw(rng, 300), draw(rng, 200)  # A spans three chunks of resampling counts
    resamples, seed = 120, 11
    table = Compare(num_resamples=resamples, seed=seed, level=0.9).evaluate(
        write(tmp_path / "a", a), write(tmp_path / "b", b)).table
    weights_a = ResampleCounts(len(a), resamples, seed, stream=0).dense()
    weights_b = ResampleCounts(len(b), resamples, seed, stream=1).dense()
    assert (weights_a.sum(1) == len(a)).all() and (weights_b.sum(1) == len(b)).all()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    shifts = np.empty((resamples, UNITS))
    for r in range(resamples):
        mean_a = np.average(a64, axis=0, weights=weights_a[r])
        std_a = np.sqrt((weights_a[r, :, None] * (a64 - mean_a) ** 2).sum(0) / (len(a) - 1))
        shifts[r] = (np.average(b64, axis=0, weights=weights_b[r]) - mean_a) / std_a
    low, high = np.quantile(shifts, [0.05, 0.95], axis=0)
    np.testing.assert_allclose(table["d_low"], low, rtol=1e-9)
    np.testing.assert_allclose(table["d_high"], high, rtol=1e-9)


def test_resample_counts_are_uniform_draws_with_replacement():
    counts = ResampleCounts(1000, 400, seed=0, stream=0).dense()
    assert counts.shape == (400, 1000) and (counts.sum(1) == 1000).all()
    # One row's count over resamples is Binomial(n, 1/n): mean 1, variance 1 - 1/n.
    assert counts.var(0).mean() == pytest.approx(1 - 1 / 1000, rel=0.05)
    assert np.array_equal(counts, ResampleCounts(1000, 400, seed=0, stream=0).dense())
    assert not np.array_equal(counts, ResampleCounts(1000, 400, seed=0, stream=1).dense())


def test_identical_runs_move_nothing(tmp_path):
    profiles = draw(np.random.default_rng(1), 150)
    result = compare(write(tmp_path / "a", profiles), write(tmp_path / "b", profiles), num_resamples=200)
    table = result.table
    assert (table["d"] == 0).all() and (table["auc"] == 0.5).all() and (table["p"] == 1).all()
    assert not table["moved"].any() and ((table["d_low"] < 0) & (table["d_high"] > 0)).all()
    assert result.top().empty and result.config["moved"] == 0 and result.config["same_data"]


def test_runs_of_one_distribution_move_nothing(tmp_path):
    rng = np.random.default_rng(0)
    result = compare(write(tmp_path / "a", draw(rng, 300)), write(tmp_path / "b", draw(rng, 250)), num_resamples=300)
    assert not result.table["moved"].any()
    assert (result.summary["moved_share"] == 0).all()


def test_the_rank_test_keeps_the_false_discovery_rate_over_many_draws():
    """Under no shift at all, some unit is a discovery in at most about fdr of the comparisons (BH's guarantee)."""
    trials, found = 200, 0
    for seed in range(trials):
        rng = np.random.default_rng(100 + seed)
        found += bool((bh_qvalues(mann_whitney(draw(rng, 300), draw(rng, 250)).p) < 0.05).any())
    assert found / trials < 0.1  # 0.05 expected; 0.1 is over three standard errors above


def test_planted_shifts_are_exactly_the_moved_units_and_the_top_movers(planted):
    run_a, run_b, _, _, shifts = planted
    result = Compare(num_resamples=500).evaluate(run_a, run_b)
    table = result.table
    assert sorted(table.loc[table["moved"], "unit_id"]) == sorted(shifts)
    assert result.top(3)["unit_id"].tolist() == sorted(shifts, key=lambda unit: -abs(shifts[unit]))
    for unit, d in shifts.items():
        assert table["d_low"][unit] < d < table["d_high"][unit], unit
        assert (table["auc"][unit] > 0.5) == (d > 0)
    summary = result.summary.set_index("layer")
    assert summary["moved"].tolist() == [1, 1, 1] and summary["top_unit"].tolist() == [3, 10, 20]
    assert (summary["mean_d_low"] <= summary["mean_d"]).all() and (summary["mean_d"] <= summary["mean_d_high"]).all()


def test_a_small_budget_gives_the_numbers_of_a_large_one(planted):
    run_a, run_b, *_ = planted
    large = Compare(num_resamples=300).evaluate(run_a, run_b)
    small = Compare(num_resamples=300, budget_mb=1, block_units=5).evaluate(run_a, run_b)
    assert large.config["passes"] == 1 and small.config["passes"] == 5
    for name in ("mean_a", "std_a", "mean_b", "d", "d_low", "d_high", "auc", "p", "q"):
        np.testing.assert_allclose(small.table[name], large.table[name], rtol=1e-12, atol=1e-15, err_msg=name)
    assert small.table["moved"].equals(large.table["moved"])
    np.testing.assert_allclose(small.summary[["mean_d", "mean_d_low", "mean_d_high"]].to_numpy(),
                               large.summary[["mean_d", "mean_d_low", "mean_d_high"]].to_numpy(), rtol=1e-12)


def test_memory_is_set_by_the_budget_not_by_the_runs(tmp_path):
    # The largest runs in view: 50,000 samples x 26,560 units each, in 256 MiB and in 64 MiB.
    for budget in (256, 64):
        plan = plan_blocks(50_000, 50_000, 26_560, 54, 1000, budget)
        assert plan.bytes <= budget << 20 and plan.passes > 1
    # Measured: a 4 MiB budget over runs whose columns alone would take 2 x 4.6 MiB.
    rng = np.random.default_rng(4)
    a, b = draw(rng, 3000, 400), draw(rng, 3000, 400)
    run_a, run_b = write(tmp_path / "a", a, np.repeat(np.arange(4), 100)), write(tmp_path / "b", b, np.repeat(
        np.arange(4), 100))
    tracemalloc.start()
    try:
        result = Compare(num_resamples=100, budget_mb=4).evaluate(run_a, run_b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.config["passes"] > 1 and peak <= 4 << 20, (result.config["passes"], peak)


def test_mismatched_or_unfinished_runs_are_refused_in_one_line(tmp_path, capsys):
    profiles = draw(np.random.default_rng(0), 40)
    a = write(tmp_path / "a", profiles)
    cases = {
        "units": (write(tmp_path / "other-layers", profiles, np.repeat([0, 1, 1], 8)), "different units: unit 16 has "
                  "layer 2 in A and 1 in B"),
        "count": (write(tmp_path / "fewer", profiles[:, :20], LAYERS[:20]), "A has 24 units and B 20"),
        "aggregation": (_edited(write(tmp_path / "abs-mean", profiles), aggregation="abs_mean"), "same --aggregation"),
        "unfinished": (_edited(write(tmp_path / "partial", profiles), complete=False), "is unfinished"),
        "selection": (write(tmp_path / "b", profiles), "selects 0 samples of run A"),
    }
    for name, (b, message) in cases.items():
        only = "misclassified" if name == "selection" else None
        with pytest.raises(InputError, match=message) as caught:
            compare(a, b.path, only=only, num_resamples=10)
        assert "\n" not in str(caught.value), name
        argv = ["compare", str(a.path), str(b.path), "--resamples", "10"] + (["--only", only] if only else [])
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("paramsal: error: ") and err.count("\n") == 1, err
    with pytest.raises(InputError, match="only='everything'"):
        Compare("everything")


def test_a_change_of_model_is_noted_not_refused(tmp_path):
    profiles = draw(np.random.default_rng(0), 40)
    a = _edited(write(tmp_path / "a", profiles), model_fingerprint="1" * 16)
    b = _edited(write(tmp_path / "b", profiles), model_fingerprint="2" * 16)
    with pytest.warns(ParamsalWarning, match="different models"):
        result = compare(a.path, b.path, num_resamples=10)
    assert not result.config["same_weights"] and len(result.table) == UNITS


def test_the_result_saves_plots_and_loads_back(planted, tmp_path):
    run_a, run_b, *_ = planted
    result = Compare(num_resamples=50, only="correct").evaluate(run_a, run_b)
    paths = result.save(tmp_path)
    assert paths["figure"].stat().st_size > 0 and result.name == "compare-vs-a-correct"
    loaded = load_result(tmp_path, result.name)
    assert loaded.table.equals(result.table) and loaded.summary.equals(result.summary)
    assert loaded.top(2).equals(result.top(2))
    assert "<img" in result._repr_html_()
    from matplotlib.figure import Figure

    figure = Figure()
    result.plot(list(figure.subplots(1, 2)))


def _edited(run, **changes):
    manifest = read_manifest(run.path)
    write_manifest(run.path, Manifest.from_json(manifest.to_json() | changes))
    return paramsal.open_run(run.path)


# The shifted copies of a data set (paramsal.zoo.shifts).

def test_shift_suffixes_are_parsed_and_built_in():
    base, shifts = split_shifts("demo:test+blur:1.5+noise:0.25")
    assert base == "demo:test" and [(s.kind, s.amount) for s in shifts] == [("blur", 1.5), ("noise", 0.25)]
    assert split_shifts("imagefolder:/data/a+b") == ("imagefolder:/data/a+b", ())
    assert is_builtin_spec("demo+noise:0.1", "data") and is_builtin_spec("demo:test+blur:2", "data")
    assert not is_builtin_spec("mine:make+noise:0.1", "data")
    for bad in ("demo:test+noise:0", "demo:test+blur:x", "demo:test+noise:inf"):
        with pytest.raises(InputError, match="takes a positive number"):
            load_data(bad)


def test_noise_is_the_same_for_a_sample_whatever_reads_it():
    base = load_data("demo:test")
    noisy = load_data("demo:test+noise:0.25")
    assert len(noisy) == len(base)
    first = noisy[17][0]
    assert torch.equal(first, noisy[17][0]) and torch.equal(first, Subset(noisy, range(20))[17][0])
    assert noisy[17][1] == base[17][1] and not torch.equal(noisy[16][0] - base[16][0], first - base[17][0])
    difference = torch.stack([noisy[i][0] - base[i][0] for i in range(200)])
    assert float(difference.mean()) == pytest.approx(0, abs=0.005)
    assert float(difference.std()) == pytest.approx(0.25, rel=0.01)
    assert torch.equal(add_noise(torch.zeros(3), 1.0, 5), add_noise(torch.zeros(3), 1.0, 5))


def test_blur_is_a_normalized_gaussian_that_commutes_with_normalization():
    image = torch.rand(2, 15, 13, dtype=torch.float64)
    blurred = gaussian_blur(image, 1.2)
    assert torch.allclose(gaussian_blur(3 * image - 0.7, 1.2), 3 * blurred - 0.7, atol=1e-12)
    assert torch.allclose(gaussian_blur(torch.full((1, 9, 9), 0.3), 2.0), torch.full((1, 9, 9), 0.3))
    # Away from the border: the 2-D Gaussian weights of a direct sum.
    offsets = torch.arange(-4, 5, dtype=torch.float64)
    weights = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.2 ** 2))
    expected = (image[0, 3:12, 2:11] * weights).sum() / weights.sum()
    assert float(blurred[0, 7, 6]) == pytest.approx(float(expected), rel=1e-12)
    assert float(blurred.var()) < float(image.var())


# End to end: the demo model on a shifted copy of its test split.

def test_compare_of_the_demo_and_its_noisy_copy_through_the_command_line(tmp_path, capsys):
    for name, spec in (("clean", "demo:test"), ("noisy", "demo:test+noise:0.5")):
        assert main(["profile", "--model", "demo", "--data", spec, "--limit", "200", "--batch-size", "100",
                     "--out", str(tmp_path / name), "--device", "cpu", "--quiet"]) == 0
    noisy = paramsal.open_run(tmp_path / "noisy")
    assert noisy.manifest["config"]["data"] == "demo:test+noise:0.5"
    from paramsal.analyses.sources import check_run_data, load_source

    check_run_data(noisy, load_source(noisy, parts=("data",))["data"])  # rebuilt from the run, same fingerprint
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "clean"), str(tmp_path / "noisy"), "--resamples", "200", "--top", "3",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "top 3 movers" in out and "features.conv1" in out
    config = json.loads((tmp_path / "out" / "compare-vs-clean.json").read_text())["config"]
    assert config["moved"] > 0 and config["data_b"] == "demo:test+noise:0.5" and config["samples_a"] == 200
