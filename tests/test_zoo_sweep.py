"""The torchvision zoo, float64, random weights: ``auto`` is the loop's numbers on every architecture, on hooks
where it can prove them, and says why not where it cannot."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from nets import relative_error, settled
from paramsal import Profiler, profile_batch
from paramsal.errors import ParamsalWarning

TOLERANCE = 1e-9


@dataclass(frozen=True)
class Architecture:
    name: str
    make: Callable[[], nn.Module]
    size: int = 32
    #: unit scheme -> the regex of the fallback note, for the schemes hooks cannot serve
    falls_back: tuple[tuple[str, str], ...] = ()


def small_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=10)


ARCHITECTURES = [
    Architecture("resnet18", lambda: tvm.resnet18(num_classes=10)),
    Architecture("resnet50", lambda: tvm.resnet50(num_classes=10)),
    Architecture("vgg11_bn", lambda: tvm.vgg11_bn(num_classes=10)),
    Architecture("densenet121", lambda: tvm.densenet121(num_classes=10)),
    Architecture("inception_v3", lambda: tvm.inception_v3(num_classes=10, init_weights=False), size=75),
    Architecture("mobilenet_v2", lambda: tvm.mobilenet_v2(num_classes=10)),
    Architecture("mobilenet_v3_small", lambda: tvm.mobilenet_v3_small(num_classes=10)),
    Architecture("efficientnet_b0", lambda: tvm.efficientnet_b0(num_classes=10)),
    Architecture("convnext_tiny", lambda: tvm.convnext_tiny(num_classes=10)),
    Architecture("regnet_y_400mf", lambda: tvm.regnet_y_400mf(num_classes=10)),
    Architecture("shufflenet_v2_x0_5", lambda: tvm.shufflenet_v2_x0_5(num_classes=10)),
    Architecture("squeezenet1_1", lambda: tvm.squeezenet1_1(num_classes=10), size=64),
    Architecture("vit_small", small_vit),  # nn.MultiheadAttention: the attention rule serves it
    # Swin folds its attention windows into the batch dimension before its qkv Linear
    Architecture("swin_t", lambda: tvm.swin_t(num_classes=10),
                 falls_back=(("conv+linear", r"attn\.qkv\.weight' is used by .*linear on an input of shape"),)),
]


@pytest.mark.parametrize("units", ["filters", "conv+linear"])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_auto_equals_the_loop(arch: Architecture, units: str):
    torch.manual_seed(arch.size)
    model = settled(arch.make())
    x = torch.randn(3, 3, arch.size, arch.size, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    want = profile_batch(model, x, y, backend="loop", units=units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(model, units=units)
        got = profiler(x, y).profiles
    assert relative_error(got, want) <= TOLERANCE
    notes = [str(w.message) for w in caught if issubclass(w.category, ParamsalWarning)]
    fallback = dict(arch.falls_back).get(units)
    if fallback is None:
        assert profiler.backend == "hooks" and not notes
    else:
        assert profiler.backend == "vmap" and len(notes) == 1
        assert re.search(fallback, notes[0])


def test_inceptions_auxiliary_branch_gets_exactly_no_gradient_in_eval_mode():
    model = settled(tvm.inception_v3(num_classes=10, init_weights=False))
    x = torch.randn(2, 3, 75, 75, dtype=torch.float64)
    profiler = Profiler(model, units="filters")
    profiles = profiler(x, torch.tensor([0, 1])).profiles
    aux = [g for g in profiler.index if g.module_name.startswith("AuxLogits.")]
    assert aux and all((profiles[:, g.offset:g.stop] == 0).all() for g in aux)
    assert (profiles[:, [g.offset for g in profiler.index if not g.module_name.startswith("AuxLogits.")]] > 0).any()
