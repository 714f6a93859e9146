"""The paper's Figures 1 and 2: the plotted numbers equal direct numpy computations, the PNGs are real."""

import matplotlib.image
import numpy as np
import pytest
from runs import make_run
from torch.utils.data import Subset

from paramsal import InputError, open_run, profile_dataset
from paramsal.analyses.profiles import SaliencyProfiles, layer_layout
from paramsal.cli import main
from paramsal.zoo import demo_dataset, demo_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """150 demo images over all classes, 3 parts."""
    data = Subset(demo_dataset("test"), range(0, 3000, 20))
    return profile_dataset(demo_model(), data, tmp_path_factory.mktemp("plots") / "run", batch_size=50,
                           part_size=50, progress=False)


def per_layer_sorted(values, layer_of_unit):
    """Direct computation: layer by layer in increasing order, values sorted descending."""
    return np.concatenate([np.sort(values[layer_of_unit == layer])[::-1] for layer in np.unique(layer_of_unit)])


def check_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800


def test_mean_profile_is_the_per_layer_sorted_mean(run, tmp_path):
    result = SaliencyProfiles().evaluate(run)
    data = result.layout("mean")
    raw = run.profiles(standardized=False).astype(np.float64)
    layer_of_unit = run.units.column("layer").to_numpy()
    np.testing.assert_allclose(data.values["mean"], per_layer_sorted(raw.mean(axis=0), layer_of_unit), rtol=1e-12)
    np.testing.assert_allclose(data.values["mean"], raw.mean(axis=0)[data.unit_ids["mean"]], rtol=1e-12)
    assert sorted(data.unit_ids["mean"]) == list(range(run.num_units))
    assert data.counts == {"mean": run.num_samples}
    check_png(result.save(tmp_path / "fig")["figure"])
    check_equal_width_layout(data, layer_of_unit)


def check_equal_width_layout(data, layer_of_unit):
    np.testing.assert_array_equal(data.layers, np.unique(layer_of_unit))
    np.testing.assert_array_equal(data.layer, np.sort(layer_of_unit, kind="stable"))
    for j, layer in enumerate(data.layers):
        x = data.x[data.layer == layer]
        n = len(x)
        np.testing.assert_allclose(x, j + (np.arange(n) + 0.5) / n)
    assert np.all(np.diff(data.x) > 0)


def test_correct_vs_incorrect_are_the_standardized_group_means(run, tmp_path):
    result = SaliencyProfiles().evaluate(run)
    data = result.layout("correct-vs-incorrect")
    raw = run.profiles(standardized=False).astype(np.float64)
    z = (raw - run.stats.mean) / run.stats.std
    correct = run.table().column("correct").to_numpy(zero_copy_only=False)
    layer_of_unit = run.units.column("layer").to_numpy()
    for name, rows in (("correct", correct), ("misclassified", ~correct)):
        expected = z[rows].mean(axis=0)
        np.testing.assert_allclose(data.values[name], per_layer_sorted(expected, layer_of_unit), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(data.values[name], expected[data.unit_ids[name]], rtol=1e-9, atol=1e-12)
        # the run's own standardized reader (float32) agrees
        np.testing.assert_allclose(np.sort(data.values[name]),
                                   np.sort(run.profiles(only=name).astype(np.float64).mean(axis=0)), atol=1e-5)
        assert data.counts[name] == rows.sum()
    assert data.values["misclassified"].mean() > data.values["correct"].mean()  # the paper's Figure 2
    check_png(result.save(tmp_path)["figure"])
    check_equal_width_layout(data, layer_of_unit)


def test_layers_are_labelled_by_module_name(run):
    figure = SaliencyProfiles().evaluate(run).plot()
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    modules = run.units.column("module").to_pylist()
    assert labels[0] == modules[0] and set(labels) <= set(modules)


def test_layout_of_unequal_interleaved_layers():
    layer_of_unit = np.array([5, 2, 5, 2, 2, 9])
    values = np.array([1.0, 3.0, 4.0, 3.0, 7.0, 0.5])
    x, layer, layers, sorted_values, unit_ids = layer_layout(layer_of_unit, {"v": values})
    assert layers.tolist() == [2, 5, 9]
    assert layer.tolist() == [2, 2, 2, 5, 5, 9]
    assert unit_ids["v"].tolist() == [4, 1, 3, 2, 0, 5]  # the tie 3.0/3.0 keeps unit order
    assert sorted_values["v"].tolist() == [7.0, 3.0, 3.0, 4.0, 1.0, 0.5]
    np.testing.assert_allclose(x, [1 / 6, 3 / 6, 5 / 6, 1.25, 1.75, 2.5])


def test_command_line_writes_both_figures(run, capsys):
    assert main(["plots", str(run.path)]) == 0
    check_png(run.path / "analyses" / "profiles.png")
    assert "Figure 2" in capsys.readouterr().out


def test_no_misclassified_sample_is_named(tmp_path):
    root = tmp_path / "all-correct"
    profiles = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    make_run(root, profiles, labels, labels, [0, 0, 1, 1], part_rows=6)
    result = SaliencyProfiles().evaluate(open_run(root))
    with pytest.raises(InputError, match="has no misclassified samples"):
        result.layout("correct-vs-incorrect")
    assert len(result.layout("mean").x) == 4
    result.plot()  # Figure 2 says what it lacks instead of failing
