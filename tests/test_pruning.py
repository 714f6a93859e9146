"""Pruning and perturbation curves: selections, per-sample rows, summaries, files, errors, command line."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset, Subset

import paramsal
import paramsal.cli
from paramsal.analyses import pruning
from paramsal.analyses.noise import gaussian_deltas
from paramsal.analyses.pruning import METRICS, Pruning
from paramsal.analyses.selection import select_units
from paramsal.analyses.unit_editing import UnitEditor
from paramsal.errors import InputError, ParamsalWarning
from paramsal.reference import pruned_copy
from paramsal.zoo import demo_dataset, demo_model

DATA_MODULE = "pruning_test_data"
SAMPLES = 200


def first_samples() -> Dataset:
    return Subset(demo_dataset("test"), range(SAMPLES))


@pytest.fixture(scope="module")
def model():
    return demo_model().eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    return paramsal.profile_dataset(model, first_samples(), tmp_path_factory.mktemp("run"), batch_size=50,
                                    progress=False, model_name="demo", data_name=f"{DATA_MODULE}:first_samples")


@pytest.fixture(scope="module")
def zeroed(run, model):
    return Pruning(model, ks=(1, 3, 10), batch_size=5, num_resamples=300).evaluate(run, first_samples())


# ------------------------------------------------------------------------------------------------ selections


def test_salient_and_least_are_the_argsort_of_the_standardized_profile():
    z = np.random.default_rng(0).normal(size=(30, 560)).astype(np.float32)
    for k in (1, 7, 100):
        top = select_units(z, k, "salient")
        least = select_units(z, k, "least")
        np.testing.assert_array_equal(top, np.argsort(z, axis=1)[:, ::-1][:, :k])
        np.testing.assert_array_equal(least, np.argsort(z, axis=1)[:, :k])
        rows = np.arange(30)[:, None]
        assert (z[rows, top].min(1) >= np.sort(z, axis=1)[:, -k]).all()


def test_random_units_are_seeded_distinct_nested_and_drawn_from_all_units():
    z = np.zeros((2000, 560), np.float32)
    ids = np.arange(2000) * 3
    first = select_units(z, 20, "random", seed=0, sample_ids=ids)
    np.testing.assert_array_equal(first, select_units(z, 20, "random", seed=0, sample_ids=ids))
    assert (first != select_units(z, 20, "random", seed=1, sample_ids=ids)).any(axis=1).mean() > 0.99
    np.testing.assert_array_equal(select_units(z, 5, "random", seed=0, sample_ids=ids), first[:, :5])
    assert all(len(set(row)) == 20 for row in first)
    assert len(np.unique(first)) == 560  # no unit is left out (the salient and least ones included)
    counts = np.bincount(first.ravel(), minlength=560)
    assert counts.min() > 30 and counts.max() < 115  # ~71 each, uniform
    # a sample's draw depends on its id, not on which other samples are analysed
    np.testing.assert_array_equal(select_units(z[:2], 20, "random", 0, ids[[5, 9]]), first[[5, 9]])
    assert (first[0] != first[1]).any()


def test_selection_errors_are_named():
    z = np.zeros((3, 10), np.float32)
    with pytest.raises(InputError, match="k=11"):
        select_units(z, 11, "salient")
    with pytest.raises(InputError, match="unknown unit selection 'top'"):
        select_units(z, 2, "top")


# -------------------------------------------------------------------------------------------- per-sample rows


def test_rows_are_the_misclassified_samples_edited_one_copy_at_a_time(run, model, zeroed):
    rows = zeroed.table
    table = run.table().to_pandas().set_index("sample_id")
    wrong = table.index[~table["correct"]]
    assert len(wrong) >= 5
    assert len(rows) == len(wrong) * 3 * 3
    assert set(rows["sample_id"]) == set(wrong)
    first = rows.drop_duplicates("sample_id").set_index("sample_id")
    np.testing.assert_allclose(first["incorrect_before"], table.loc[first.index, "pred_prob"], atol=1e-5)
    np.testing.assert_allclose(first["true_before"], table.loc[first.index, "target_prob"], atol=1e-5)
    assert (rows["corrected"] == (rows["new_pred"] == rows["target"])).all()

    data = first_samples()
    z = run.profiles(only=wrong.to_numpy())
    editor = UnitEditor.locate(model, data[0][0][None])
    for selection in ("salient", "random", "least"):
        units = select_units(z, 10, selection, 0, wrong.to_numpy())
        for i in (0, len(wrong) - 1):
            sid = int(wrong[i])
            with torch.no_grad():
                probs = torch.softmax(pruned_copy(editor, units[i, :3])(data[sid][0][None]).double(), 1)[0]
            row = rows[(rows.sample_id == sid) & (rows.selection == selection) & (rows.k == 3)].iloc[0]
            assert row.incorrect_after == pytest.approx(probs[row.pred].item(), abs=1e-5)
            assert row.true_after == pytest.approx(probs[row.target].item(), abs=1e-5)
            assert row.delta_incorrect == pytest.approx(row.incorrect_after - row.incorrect_before, abs=1e-12)


def test_noise_rows_equal_copies_with_that_samples_noise_and_ignore_batching(run, model):
    data = first_samples()
    small = Pruning(model, ks=(2, 8), select="salient,random", mode="noise", noise_std=0.02, batch_size=4,
                    num_resamples=100).evaluate(run, data)
    large = Pruning(model, ks=(2, 8), select="salient,random", mode="noise", noise_std=0.02, batch_size=64,
                    num_resamples=100).evaluate(run, data)
    a, b = small.table, large.table
    key = ["selection", "k", "sample_id"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
    assert a["delta_incorrect"].abs().max() > 1e-3

    sid = int(a.sample_id.iloc[0])
    z = run.profiles(only=[sid])
    units = select_units(z, 8, "random", 0, [sid])
    editor = UnitEditor.locate(model, data[0][0][None])
    deltas = gaussian_deltas(editor.index, units, 0.02, [pruning.noise_seed(0, sid)])
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for delta in deltas:
            noisy.get_parameter(delta.param)[delta.channels] += delta.values
        probs = torch.softmax(noisy(data[sid][0][None]).double(), 1)[0]
    row = a[(a.sample_id == sid) & (a.selection == "random") & (a.k == 8)].iloc[0]
    assert row.incorrect_after == pytest.approx(probs[row.pred].item(), abs=1e-5)


def test_zeroing_ignores_batching_and_leaves_the_model_as_it_was(run, model, zeroed):
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        other = Pruning(model, ks=(1, 3, 10), batch_size=64, num_resamples=300).evaluate(run, first_samples())
        assert model.training and model.features.bn1.training
    finally:
        model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    key = ["selection", "k", "sample_id"]
    pd.testing.assert_frame_equal(zeroed.table.sort_values(key).reset_index(drop=True),
                                  other.table.sort_values(key).reset_index(drop=True),
                                  check_exact=False, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------- summary and files


def test_summary_means_and_intervals(zeroed):
    rows = zeroed.table
    summary = zeroed.summary.set_index(["selection", "k"])
    assert len(summary) == 9
    for metric, spec in METRICS.items():
        column, scale = spec.column, spec.scale
        expected = rows.groupby(["selection", "k"])[column].mean() * scale
        np.testing.assert_allclose(summary[metric], expected.loc[summary.index], rtol=1e-9)
        assert (summary[f"{metric}_low"] <= summary[metric] + 1e-12).all()
        assert (summary[metric] <= summary[f"{metric}_high"] + 1e-12).all()
    assert (summary["n"] == rows.sample_id.nunique()).all()
    assert list(zeroed.metric_table().columns) == ["salient", "random", "least"]


def test_save_writes_parquet_tables_and_the_figure(tmp_path, zeroed):
    paths = zeroed.save(tmp_path / "analyses")
    assert {p.name for p in paths.values()} == {"pruning.parquet", "pruning-summary.parquet", "pruning.json",
                                                "pruning.png"}
    assert len(pd.read_parquet(paths["table"])) == len(zeroed.table)
    assert len(pd.read_parquet(paths["summary"])) == 9
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------------- errors


def test_options_and_mismatches_are_named(tmp_path, run, model):
    with pytest.raises(InputError, match="unknown selection"):
        Pruning(model, select=("salient", "top"))
    with pytest.raises(InputError, match="unknown mode"):
        Pruning(model, mode="drop")
    with pytest.raises(InputError, match=r"every k of \[600\] exceeds the run's 560 units"):
        Pruning(model, ks=(600,)).evaluate(run, first_samples())
    with pytest.warns(ParamsalWarning, match=r"k=\[600\] exceed the run's 560 units") as notes:
        dropped = Pruning(model, ks=(1, 600), select="salient", num_resamples=10).evaluate(run, first_samples())
    assert len(notes) == 1 and dropped.config["ks"] == [1] and dropped.config["ks_dropped"] == [600]
    with pytest.raises(InputError, match="unknown ranking 'gumbel'"):
        Pruning(model, ranking="gumbel")
    with pytest.raises(InputError, match="weights differ"):
        Pruning(demo_model(pretrained=False), ks=(1,)).evaluate(run, first_samples())
    from nets import TinyResNet

    with pytest.raises(InputError, match="do not match the run"):
        Pruning(TinyResNet(), ks=(1,)).evaluate(run, first_samples())

    class Relabelled(Dataset):
        def __len__(self):
            return SAMPLES

        def __getitem__(self, i):
            x, y = first_samples()[i]
            return x, (y + 1) % 10

    with pytest.raises(InputError, match="is not the one .* profiled"):
        Pruning(model, ks=(1,)).evaluate(run, Relabelled())
    with pytest.raises(InputError, match="data set does not match the run"):
        Pruning(model, ks=(1,), allow_other_data=True).evaluate(run, Relabelled())

    correct = run.sample_ids(only="correct")[:12]
    only_correct = paramsal.profile_dataset(model, Subset(first_samples(), correct), tmp_path / "correct",
                                            batch_size=12, progress=False)
    with pytest.raises(InputError, match="no misclassified samples"):
        Pruning(model, ks=(1,)).evaluate(only_correct, Subset(first_samples(), correct))


# ---------------------------------------------------------------------------------------------- command line


def test_prune_command_reads_the_runs_specs_and_writes_next_to_it(tmp_path, run, monkeypatch, capsys):
    (tmp_path / f"{DATA_MODULE}.py").write_text(
        "from torch.utils.data import Subset\nfrom paramsal.zoo import demo_dataset\n\n"
        f"def first_samples():\n    return Subset(demo_dataset('test'), range({SAMPLES}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    # The run names its data as module:callable, which is called only for a run its maker trusts.
    assert paramsal.cli.main(["prune", str(run.path), "--ks", "1,5", "--select", "salient,least", "--resamples",
                              "200", "--device", "cpu", "--out", str(out), "--trust-run-specs", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "salient" in printed and "least" in printed and "delta_incorrect" in printed
    summary = pd.read_parquet(out / "pruning-summary.parquet")
    assert list(summary["selection"]) == ["salient", "salient", "least", "least"]
    assert (out / "pruning.png").is_file()
    assert paramsal.cli.main(["prune", str(run.path), "--ks", "0,2"]) == 2
    assert "--ks: expected positive integers" in capsys.readouterr().err


# ------------------------------------------------------------------------------- noise once per (sample, unit)


def test_noise_of_a_unit_is_the_same_whatever_k_and_selection(run, model):
    data = first_samples()
    some = run.sample_ids("misclassified")[:3]
    result = Pruning(model, ks=(4, 560), mode="noise", noise_std=0.05, batch_size=2,
                     num_resamples=10).evaluate(run, data, samples=some)
    assert result.name == "perturbation-std0.05"
    rows = result.table
    assert rows["delta_incorrect"].abs().max() > 1e-3
    # k = all units: the three selections perturb the same units with the same noise
    at_all = rows[rows.k == 560].set_index("sample_id")
    measured = ["incorrect_after", "true_after", "new_pred"]
    for selection in ("random", "least"):
        pd.testing.assert_frame_equal(at_all[at_all.selection == selection][measured],
                                      at_all[at_all.selection == "salient"][measured], check_exact=True)
    index = paramsal.units_of(model, "filters")
    seed = pruning.noise_seed(0, int(some[0]))
    assert seed != pruning.noise_seed(0, int(some[1])) and seed != pruning.noise_seed(1, int(some[0]))

    def noise_by_unit(units):
        deltas = gaussian_deltas(index, [units], 0.05, [seed])
        found = {}
        for delta in deltas:
            group = next(g for g in index if g.param_name == delta.param)
            for channel, values in zip(delta.channels.tolist(), delta.values):
                found[group.offset + channel] = values
        return found

    alone = noise_by_unit([500])
    with_others = noise_by_unit([7, 500, 3, 120])
    reordered = noise_by_unit([120, 3, 7])
    torch.testing.assert_close(with_others[500], alone[500], rtol=0, atol=0)
    for unit in (3, 7, 120):
        torch.testing.assert_close(with_others[unit], reordered[unit], rtol=0, atol=0)
    assert not torch.equal(with_others[3].flatten()[:4], with_others[7].flatten()[:4])
