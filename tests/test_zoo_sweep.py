"""The torchvision and timm zoos, float64, random weights: ``auto`` is the loop's numbers on every architecture,
on hooks where it can prove them, and says why not where it cannot. ``make test`` runs the fast subset;
``make test-all`` the architectures marked ``full`` too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from nets import profiled_by_auto, relative_error, settled
from torch import nn
from torchvision import models as tvm

from paramsal import Profiler, profile_batch

TOLERANCE = 1e-9


@dataclass(frozen=True)
class Architecture:
    name: str
    make: Callable[[], nn.Module]
    size: int = 32
    #: unit scheme -> (the backend auto ends on, the regex of its fallback notes), for the schemes hooks cannot serve
    falls_back: tuple[tuple[str, tuple[str, str]], ...] = ()
    full: bool = False  # only in make test-all


def small_vit() -> nn.Module:
    model = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                  num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: no gradient below it
    return model


def timm_model(name: str, **options) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **options)
    return make


#: Swin folds its attention windows into the batch dimension before its qkv Linear.
WINDOWS_IN_THE_BATCH = ("conv+linear", ("vmap", r"attn\.qkv\.weight' is used by .*linear on an input of shape"))

ARCHITECTURES = [
    Architecture("resnet18", lambda: tvm.resnet18(num_classes=10)),
    Architecture("resnet50", lambda: tvm.resnet50(num_classes=10), full=True),
    Architecture("vgg11_bn", lambda: tvm.vgg11_bn(num_classes=10)),
    Architecture("densenet121", lambda: tvm.densenet121(num_classes=10), full=True),
    Architecture("inception_v3", lambda: tvm.inception_v3(num_classes=10, init_weights=False), size=75, full=True),
    Architecture("mobilenet_v2", lambda: tvm.mobilenet_v2(num_classes=10)),
    Architecture("mobilenet_v3_small", lambda: tvm.mobilenet_v3_small(num_classes=10)),
    Architecture("efficientnet_b0", lambda: tvm.efficientnet_b0(num_classes=10)),
    Architecture("convnext_tiny", lambda: tvm.convnext_tiny(num_classes=10)),
    Architecture("regnet_y_400mf", lambda: tvm.regnet_y_400mf(num_classes=10)),
    Architecture("shufflenet_v2_x0_5", lambda: tvm.shufflenet_v2_x0_5(num_classes=10)),
    Architecture("squeezenet1_1", lambda: tvm.squeezenet1_1(num_classes=10), size=64),
    Architecture("vit_small", small_vit),  # nn.MultiheadAttention: the attention rule serves it
    Architecture("swin_t", lambda: tvm.swin_t(num_classes=10), falls_back=(WINDOWS_IN_THE_BATCH,), full=True),
    # timm: its own Linear subclass, LayerNorm2d, fused attention, and families torchvision lacks
    Architecture("timm:resnet18", timm_model("resnet18")),
    Architecture("timm:efficientnet_b0", timm_model("efficientnet_b0")),
    Architecture("timm:mobilenetv3_small_100", timm_model("mobilenetv3_small_100")),
    Architecture("timm:convnext_atto", timm_model("convnext_atto")),
    Architecture("timm:regnetx_002", timm_model("regnetx_002")),
    Architecture("timm:vit_tiny", timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8)),
    Architecture("timm:deit_tiny", timm_model("deit_tiny_patch16_224", img_size=32, patch_size=8)),
    Architecture("timm:ghostnet_100", timm_model("ghostnet_100")),
    Architecture("timm:dla34", timm_model("dla34"), full=True),
    Architecture("timm:resnetv2_50", timm_model("resnetv2_50"), full=True),
    Architecture("timm:coatnet_0_rw", timm_model("coatnet_0_rw_224", img_size=64), size=64, full=True),
    Architecture("timm:swin_tiny", timm_model("swin_tiny_patch4_window7_224", img_size=56), size=56,
                 falls_back=(WINDOWS_IN_THE_BATCH,), full=True),
    # LeViT caches its attention biases across calls in eval mode: batched backends mix the samples' gradients,
    # which the check against the loop on one sample catches (hooks, then vmap); the loop is what is left
    Architecture("timm:levit_128s", timm_model("levit_128s", img_size=64), size=64,
                 falls_back=(("filters", ("loop", "backward pass mixes the samples")),
                             ("conv+linear", ("loop", "backward pass mixes the samples"))), full=True),
]


@pytest.mark.parametrize("units", ["filters", "conv+linear"])
@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.full] if a.full else []) for a in ARCHITECTURES],
                         ids=lambda a: a.name)
def test_auto_equals_the_loop(arch: Architecture, units: str):
    if arch.name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(arch.size)
    model = settled(arch.make())
    x = torch.randn(3, 3, arch.size, arch.size, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    want = profile_batch(model, x, y, backend="loop", units=units)
    got, ended_on, notes = profiled_by_auto(model, x, y, units=units)
    assert relative_error(got, want) <= TOLERANCE
    fallback = dict(arch.falls_back).get(units)
    if fallback is None:
        assert ended_on == "hooks" and not notes
    else:
        backend, note = fallback
        assert ended_on == backend and len(notes) == ("hooks", "vmap", "loop").index(backend)
        assert all(re.search(note, n) for n in notes)


def test_inceptions_auxiliary_branch_gets_exactly_no_gradient_in_eval_mode():
    model = settled(tvm.inception_v3(num_classes=10, init_weights=False))
    x = torch.randn(2, 3, 75, 75, dtype=torch.float64)
    profiler = Profiler(model, units="filters")
    profiles = profiler(x, torch.tensor([0, 1])).profiles
    aux = [g for g in profiler.index if g.module_name.startswith("AuxLogits.")]
    assert aux and all((profiles[:, g.offset:g.stop] == 0).all() for g in aux)
    assert (profiles[:, [g.offset for g in profiler.index if not g.module_name.startswith("AuxLogits.")]] > 0).any()


#: (architecture, unit scheme, the backend auto ends on): the optional units of parameters added to or multiplied
#: with a batch. timm's ConvNeXt reshapes its gamma before the product, a use no rule serves.
ELEMENTWISE_UNITS = [
    ("convnext_tiny", lambda: tvm.convnext_tiny(num_classes=10), "layer-scale", "hooks"),
    ("vit_small", small_vit, "position-embedding", "hooks"),
    ("timm:vit_tiny", timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, init_values=0.1), "layer-scale",
     "hooks"),
    ("timm:vit_tiny", timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8), "position-embedding", "hooks"),
    ("timm:convnext_atto", timm_model("convnext_atto"), "layer-scale", "vmap"),
]


@pytest.mark.parametrize("name, make, units, backend", ELEMENTWISE_UNITS, ids=lambda v: v if isinstance(v, str) else "")
def test_layer_scale_and_position_embedding_units_equal_the_loop(name: str, make, units: str, backend: str):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = settled(make())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    want = profile_batch(model, x, y, backend="loop", units=units)
    got, ended_on, notes = profiled_by_auto(model, x, y, units=units)
    assert ended_on == backend and len(notes) == (backend != "hooks")
    assert relative_error(got, want) <= TOLERANCE
    assert (want > 0).all()  # every position and channel carries gradient: the units are not trivially zero
