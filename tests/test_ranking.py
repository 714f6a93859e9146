"""ranking= and reference= in the analyses, and the depth-bias diagnostic, against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

import paramsal
import paramsal.cli
from paramsal.analyses import DepthBias, FineTune, InputSaliency, Pruning, load_result
from paramsal.analyses.selection import run_tails
from paramsal.analyses.unit_editing import UnitEditor
from paramsal.engine.profile import profile_batch
from paramsal.errors import InputError
from paramsal.reference import pruned_copy
from paramsal.zoo import demo_dataset, demo_model

SAMPLES = 300


def data():
    return Subset(demo_dataset("test"), range(0, 3000, 3000 // SAMPLES))


@pytest.fixture(scope="module")
def model():
    return demo_model().eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    return paramsal.profile_dataset(model, data(), tmp_path_factory.mktemp("run"), batch_size=100, progress=False)


def top_units(run, ids, ranking="pot", reference="all", k=3):
    return np.argsort(-run.scores(ranking, only=ids, reference=reference), axis=1, kind="stable")[:, :k]


def test_pot_pruning_turns_off_each_mistakes_top_tail_scores(run, model):
    result = Pruning(model, ks=(3,), select="salient", ranking="pot", num_resamples=100).evaluate(run, data())
    wrong = run.sample_ids("misclassified")
    assert result.name == "pruning-pot" and len(result.table) == len(wrong)
    units = top_units(run, wrong)
    assert not np.array_equal(units, top_units(run, wrong, "zscore"))  # the rankings differ here, so this tests one
    dataset = data()
    editor = UnitEditor.locate(model, dataset[0][0][None])
    for i in (0, len(wrong) // 2, len(wrong) - 1):
        sid = int(wrong[i])
        with torch.no_grad():
            probs = torch.softmax(pruned_copy(editor, units[i])(dataset[sid][0][None]).double(), 1)[0]
        row = result.table[result.table.sample_id == sid].iloc[0]
        assert row.true_after == pytest.approx(probs[row.target].item(), abs=1e-5)
        assert row.incorrect_after == pytest.approx(probs[row.pred].item(), abs=1e-5)


def test_a_reference_changes_the_units_and_the_results_name(run, model):
    wrong = run.sample_ids("misclassified")
    by_class = Pruning(model, ks=(1,), select="salient", reference="class", num_resamples=50).evaluate(run, data())
    assert by_class.name == "pruning-ref-class" and by_class.config["reference"] == "class"
    zeroed = Pruning(model, ks=(1,), select="salient", num_resamples=50).evaluate(run, data())
    dataset = data()
    editor = UnitEditor.locate(model, dataset[0][0][None])
    unit = top_units(run, wrong, "zscore", "class", k=1)
    changed = np.flatnonzero(unit[:, 0] != top_units(run, wrong, "zscore", k=1)[:, 0])
    assert len(changed)
    sid = int(wrong[changed[0]])
    with torch.no_grad():
        probs = torch.softmax(pruned_copy(editor, unit[changed[0]])(dataset[sid][0][None]).double(), 1)[0]
    row = by_class.table[by_class.table.sample_id == sid].iloc[0]
    assert row.true_after == pytest.approx(probs[row.target].item(), abs=1e-5)
    assert zeroed.table[zeroed.table.sample_id == sid].iloc[0].true_after != pytest.approx(row.true_after, abs=1e-9)


def test_finetune_names_its_ranking_and_refuses_unknown_ones(model):
    assert FineTune(model, ranking="pot", lr=1e-3).ranking == "pot"
    with pytest.raises(InputError, match="ranking"):
        FineTune(model, ranking="gumbel")
    with pytest.raises(InputError, match="unknown reference 'validation'"):
        Pruning(model, reference="validation")


def test_pot_input_saliency_boosts_the_tail_scores_top_units(run, model):
    explainer = InputSaliency.for_run(model, run, ranking="pot", k=4)
    dataset = data()
    inputs = torch.stack([dataset[i][0] for i in range(6)])
    targets = torch.tensor([dataset[i][1] for i in range(6)])
    raw = profile_batch(model, inputs, targets, units=explainer.index).double().numpy()
    expected = np.argsort(-run_tails(run).score(raw), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(explainer.choose(inputs, targets).numpy(), expected)
    with pytest.raises(InputError, match="ranking='pot'"):
        InputSaliency(model, stats=run.stats, ranking="pot").choose(inputs, targets)


def test_depth_bias_counts_the_layers_of_each_rankings_top_units(run, tmp_path):
    result = DepthBias(k=5).evaluate(run)
    wrong = run.sample_ids("misclassified")
    layer_of_unit = run.units.column("layer").to_numpy()
    layers = np.unique(layer_of_unit)
    for ranking in ("zscore", "pot"):
        chosen = layer_of_unit[top_units(run, wrong, ranking, k=5).ravel()]
        rows = result.table[result.table.ranking == ranking]
        np.testing.assert_allclose(rows["top_share"], [(chosen == layer).mean() for layer in layers])
        np.testing.assert_allclose(rows["unit_share"], [(layer_of_unit == layer).mean() for layer in layers])
        depth = np.searchsorted(layers, chosen) / (len(layers) - 1)
        summary = result.summary.set_index("ranking").loc[ranking]
        assert summary["mean_depth"] == pytest.approx(depth.mean())
        assert summary["deep_share"] == pytest.approx((depth > 2 / 3).mean())
    assert result.plot().axes
    result.save(tmp_path)
    pd.testing.assert_frame_equal(load_result(tmp_path, "depth-bias").table, result.table)


def test_depth_bias_command(run, tmp_path, capsys):
    assert paramsal.cli.main(["depth-bias", str(run.path), "--k", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "zscore" in printed and "pot" in printed and (tmp_path / "depth-bias.png").is_file()
    assert paramsal.cli.main(["depth-bias", str(run.path), "--reference", "nowhere"]) == 2
    assert "unknown reference 'nowhere'" in capsys.readouterr().err
