"""The "norm" units (BatchNorm / LayerNorm / GroupNorm weight and bias) on the hooks backend (kernels/norm.py),
against the one-sample loop in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import relative_error, settled
from torch import nn
from torchvision import models as tvm

from paramsal import Profiler, profile_batch, units_of
from paramsal.errors import ParamsalWarning

TOLERANCE = 1e-9


def grouped() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 10))


def vit() -> nn.Module:
    model = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                  num_classes=10)
    nn.init.normal_(model.heads.head.weight)
    return model


MODELS = {"resnet18": lambda: tvm.resnet18(num_classes=10), "group_batch_layer": grouped, "vit": vit,
          "swin_t": lambda: tvm.swin_t(num_classes=10)}


@pytest.mark.parametrize("name", MODELS)
def test_norm_units_on_hooks_equal_the_loop(name):
    model = settled(MODELS[name](), affine=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    want = profile_batch(model, x, y, backend="loop", units="norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParamsalWarning)
        profiler = Profiler(model, units="norm")
        got = profiler(x, y).profiles
    assert profiler.backend == "hooks"
    assert relative_error(got, want) <= TOLERANCE


def test_the_norm_scheme_takes_one_unit_per_channel_of_weight_and_bias():
    groups = units_of(grouped(), "norm")
    assert [(g.param_name, g.num_units) for g in groups] == [
        ("1.weight", 8), ("1.bias", 8), ("4.weight", 4), ("4.bias", 4), ("8.weight", 6), ("8.bias", 6)]
