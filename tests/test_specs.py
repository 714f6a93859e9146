"""Model and data specs of the command line load real files and nothing else."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from paramsal import InputError, open_run
from paramsal.cli import main
from paramsal.zoo.specs import load_data, load_model


def test_imagefolder_and_factory_specs_profile_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png")
    code = main(["profile", "--model", "nets:rgb32_classifier", "--data", f"imagefolder:{tmp_path}/images",
                 "--transform", "tensor", "--out", str(tmp_path / "run"), "--batch-size", "4", "--quiet"])
    assert code == 0
    run = open_run(tmp_path / "run")
    assert run.complete and run.num_samples == 6
    assert run.table().column("target").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert run.manifest["config"]["data"] == f"imagefolder:{tmp_path}/images"
    assert "samples    6" in capsys.readouterr().out


def test_torchvision_spec_loads_the_given_weights_only(tmp_path):
    reference = torchvision.models.resnet18(num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = load_model("torchvision:resnet18", str(tmp_path / "w.pth"), num_classes=3)
    assert not model.training
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(InputError, match="does not fit the model"):
        load_model("torchvision:resnet18", str(tmp_path / "w.pth"))
    with pytest.raises(InputError, match="weights file .* does not exist"):
        load_model("torchvision:resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="no model 'resnet19'"):
        load_model("torchvision:resnet19")


def test_bad_specs_are_named():
    with pytest.raises(InputError, match="not understood"):
        load_data("somewhere")
    with pytest.raises(InputError, match="cannot import"):
        load_model("no_such_module:build")
    with pytest.raises(InputError, match="unknown transform"):
        load_data("imagefolder:.", transform="fancy")
