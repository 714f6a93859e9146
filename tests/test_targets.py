"""target="label" | "predicted" | class index: the loss each sample's profile is taken at, on every backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nets import relative_error
from torch.utils.data import Subset

import paramsal
import paramsal.cli
from paramsal import InputError, RunMismatchError, profile_batch
from paramsal.zoo import demo_dataset, demo_model

BACKENDS = ("loop", "vmap", "hooks")

TOLERANCE = 1e-9  # of each row's largest entry: float64, the backends sum in other orders


@pytest.fixture(scope="module")
def batch():
    """Twelve demo images, some of them misclassified, float64."""
    model = demo_model().double().eval()
    data = demo_dataset("test")
    ids = [12, 14, 26, 28, 40, 0, 1, 2, 3, 4, 5, 6]  # the first five are mistakes of the demo model
    x = torch.stack([data[i][0] for i in ids]).double()
    y = torch.tensor([data[i][1] for i in ids])
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert (predicted != y).sum() >= 3
    return model, x, y, predicted


@pytest.mark.parametrize("backend", BACKENDS)
def test_predicted_is_the_label_replaced_by_the_prediction(batch, backend):
    model, x, y, predicted = batch
    want = profile_batch(model, x, predicted, backend="loop")
    got = profile_batch(model, x, y, backend=backend, target="predicted")
    assert relative_error(got, want) <= TOLERANCE
    assert not torch.allclose(got, profile_batch(model, x, y, backend="loop"))  # the mistakes' profiles change


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_index_is_every_label_replaced_by_that_class(batch, backend):
    model, x, y, _ = batch
    want = profile_batch(model, x, torch.full_like(y, 3), backend="loop")
    assert relative_error(profile_batch(model, x, y, backend=backend, target=3), want) <= TOLERANCE


def test_bad_targets_are_named(batch):
    model, x, y, _ = batch
    with pytest.raises(InputError, match="target=10 is outside the model's 10 classes"):
        profile_batch(model, x, y, target=10)
    for bad in ("truth", -1, 1.5, True):
        with pytest.raises(InputError, match="expected 'label' or 'predicted' or a class index"):
            profile_batch(model, x, y, target=bad)


def test_a_run_records_its_target_and_a_resume_must_repeat_it(tmp_path, capsys):
    data = Subset(demo_dataset("test"), range(40))
    run = paramsal.profile_dataset(demo_model(), data, tmp_path / "run", batch_size=20, target="predicted",
                                   progress=False)
    assert run.manifest["config"]["target"] == "predicted"
    table = run.table().to_pandas()
    np.testing.assert_array_equal(table["target"], [data[i][1] for i in range(40)])  # the labels, as given
    with pytest.raises(RunMismatchError, match="target"):
        paramsal.profile_dataset(demo_model(), data, tmp_path / "run", batch_size=20, progress=False)
    assert paramsal.cli.main(["profile", "--model", "demo", "--data", "demo:test", "--limit", "8", "--out",
                              str(tmp_path / "cli"), "--target", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["config"]["target"] == 2
    assert paramsal.cli.main(["profile", "--model", "demo", "--data", "demo:test", "--out", str(tmp_path / "x"),
                              "--target", "truth"]) == 2
    assert "--target: expected label or predicted or a class index" in capsys.readouterr().err
