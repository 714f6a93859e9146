"""Model and data specs of the command line load real files and nothing else."""

import json

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


def write_jpegs(folder, count=4, size=(48, 40)):
    rng = np.random.default_rng(1)
    for i in range(count):
        label = folder / ("cat" if i % 2 else "dog")
        label.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(label / f"{i}.jpg", quality=95)


@pytest.mark.parametrize("transform", ["imagenet", "tensor"])
def test_both_decoders_give_the_same_images_to_a_rounding(tmp_path, transform):
    write_jpegs(tmp_path)
    by_pil, by_torchvision = (load_data(f"imagefolder:{tmp_path}", transform, decode)
                              for decode in ("pil", "torchvision"))
    for i in range(len(by_pil)):
        (a, label_a), (b, label_b) = by_pil[i], by_torchvision[i]
        assert label_a == label_b and a.shape == b.shape and a.dtype == b.dtype == torch.float32
        # Decoding agrees to the last bit of a pixel; antialiased resizing of a 48x40 image to 256 adds a little.
        assert float((a - b).abs().max()) < (1.5 / 255 / 0.224 if transform == "imagenet" else 1 / 255 + 1e-6)
    with pytest.raises(InputError, match="unknown image decoder 'cv2'"):
        load_data(f"imagefolder:{tmp_path}", transform, "cv2")


@pytest.mark.parametrize("decode", ["torchvision", "pil", None])
def test_an_analysis_rebuilds_the_images_with_the_runs_decoder(tmp_path, decode):
    """None: a run made before the choice existed, whose images PIL decoded."""
    from paramsal.analyses.sources import SourceOverrides, load_source

    write_jpegs(tmp_path / "images", count=6, size=(32, 32))
    out, spec = tmp_path / "run", f"imagefolder:{tmp_path}/images"
    assert main(["profile", "--model", "nets:rgb32_classifier", "--data", spec, "--transform", "tensor",
                 "--decode", decode or "pil", "--out", str(out), "--batch-size", "3", "--quiet"]) == 0
    if decode is None:
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["source"]["decode"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = load_source(open_run(out), SourceOverrides(model="nets:rgb32_classifier"), parts=("data",))["data"]
    for other in ("torchvision", "pil"):
        # the two decoders' float conversions differ in the last bits, so equality tells them apart
        same = np.array_equal(rebuilt[0][0].numpy(), load_data(spec, "tensor", other)[0][0].numpy())
        assert same == (other == (decode or "pil")), other
