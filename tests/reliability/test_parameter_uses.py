"""Exact or refused: the hooks backend sees every use of every unit parameter.

Each model uses a unit's weight outside its module's single call. ``auto``
must equal the one-sample loop; explicit ``hooks`` must equal it too or
refuse, naming the parameter and the call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from nets import SharedParameter, relative_error
from torch import nn

from paramsal import Profiler, UnsupportedModuleError, profile_batch
from paramsal.errors import ParamsalWarning
from paramsal.kernels import register_reducer, unregister_reducer
from paramsal.kernels.conv import reduce_conv

TOLERANCE = 1e-9


class FunctionalOnly(nn.Module):
    """A Conv2d that is never called: its weight goes to F.conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)).mean((2, 3)))


class CalledThenReused(nn.Module):
    """A conv called, then its weight used once more through F.conv2d (stride 2, 'same'-free)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = F.conv2d(h, self.conv.weight, None, stride=2)
        return self.fc(h.mean((2, 3)))


class TiedLanguageModel(nn.Module):
    """A tied embedding / LM head (``emb.weight = head.weight``); the head's param comes first."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.head = nn.Linear(dim, vocab, bias=False)
        self.emb = nn.Embedding(vocab, dim)
        self.emb.weight = self.head.weight
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))).mean(1))


def small_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=8, mlp_dim=12, num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: no gradient would reach the body
    return model


class ScaledWeight(nn.Module):
    """The weight enters F.conv2d through an op no rule serves (weight * 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.conv.weight * 2, self.conv.bias).mean((2, 3)))


class StandardizedConv(nn.Conv2d):
    """Keeps Conv2d's forward but standardizes the weight in ``_conv_forward`` (weight standardization)."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, weight, bias)


class ParameterInLoss(nn.Module):
    """A plain CNN; the test's loss adds a penalty on the conv weight, a use outside the forward pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class SequenceFirst(nn.Module):
    """A Linear applied to a time-major tensor ``[T, N, C]`` (as ``batch_first=False`` models do): its input's
    first dimension is time, so a reducer that took rows for samples would mix them, silently when T == N."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):  # x [N, T, C]
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    units: str = "filters"
    hooks_exact: bool = True  # False: explicit hooks must refuse
    refusal: str = ""  # regex the refusal must match (parameter and call)
    classes: int = 5


def images(shape=(4, 3, 8, 8)) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, dtype=torch.float64)


CASES = [
    Case("functional_only", FunctionalOnly, images()),
    Case("called_then_reused", CalledThenReused, images()),
    Case("shared_parameter", SharedParameter, images()),
    Case("shared_parameter_conv_linear", SharedParameter, images(), units="conv+linear"),
    # the table is used by F.linear (the head) and by F.embedding: both served, their whole gradients summed
    Case("tied_embedding_lm_head", TiedLanguageModel, lambda: torch.randint(0, 11, (4, 7)), "linear-columns",
         classes=11),
    # out_proj's weight reaches F.multi_head_attention_forward, which the attention rule serves whole
    Case("vit_out_proj", small_vit, images((3, 3, 16, 16)), "conv+linear"),
    Case("scaled_weight", ScaledWeight, images(), hooks_exact=False,
         refusal=r"'conv\.weight' is passed to torch\.Tensor\.mul at test_parameter_uses\.py:\d+"),
    # T != N: the shapes tell; T == N (4) and T == 2 (the probe's size): only the two-sample probe tells
    *(Case(f"sequence_first_T{steps}", SequenceFirst, images((4, steps, 4)), "conv+linear", hooks_exact=False,
           refusal=r"'lin\.weight' is used by torch\.nn\.functional\.linear on (an input of shape|inputs whose "
                   r"rows are not samples)") for steps in (3, 4, 2)),
    Case("standardized_conv", lambda: nn.Sequential(StandardizedConv(3, 4, 3), nn.Flatten(), nn.Linear(144, 5)),
         images(), hooks_exact=False,
         refusal=r"'0\.weight' is passed to torch\.Tensor\.(mean|std) at test_parameter_uses\.py:\d+"),
]


def build(case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = case.make().double().eval()
    x = case.inputs()
    y = torch.randint(0, case.classes, (len(x),))
    return model, x, y


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_auto_equals_the_loop(case: Case):
    model, x, y = build(case)
    want = profile_batch(model, x, y, backend="loop", units=case.units)
    assert want.abs().max() > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(model, units=case.units)
        got = profiler(x, y).profiles
    assert relative_error(got, want) <= TOLERANCE
    fell_back = [w for w in caught if issubclass(w.category, ParamsalWarning)]
    assert profiler.backend == ("hooks" if case.hooks_exact else "vmap")
    assert len(fell_back) == (0 if case.hooks_exact else 1)
    profiler(x, y)  # the fallback sticks: no second warning, no second try
    assert len([w for w in caught if issubclass(w.category, ParamsalWarning)]) == len(fell_back)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_explicit_hooks_is_exact_or_refuses_naming_the_use(case: Case):
    model, x, y = build(case)
    if case.hooks_exact:
        want = profile_batch(model, x, y, backend="loop", units=case.units)
        assert relative_error(profile_batch(model, x, y, backend="hooks", units=case.units), want) <= TOLERANCE
    else:
        with pytest.raises(UnsupportedModuleError, match=case.refusal):
            profile_batch(model, x, y, backend="hooks", units=case.units)


def test_a_parameter_used_by_the_loss_is_seen():
    model = ParameterInLoss().double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])

    def penalized(out, target):
        return F.cross_entropy(out, target, reduction="none") + 0.1 * model.conv.weight.square().sum()

    want = profile_batch(model, x, y, backend="loop", loss=penalized)
    with pytest.raises(UnsupportedModuleError, match=r"'conv\.weight' is passed to torch\.Tensor\.square"):
        profile_batch(model, x, y, backend="hooks", loss=penalized)
    with pytest.raises(UnsupportedModuleError, match=r"'conv\.weight' is used outside .* backend='loop'"):
        profile_batch(model, x, y, backend="vmap", loss=penalized)
    with pytest.warns(ParamsalWarning) as caught:
        profiler = Profiler(model, loss=penalized)
        got = profiler(x, y).profiles
    assert profiler.backend == "loop" and len(caught) == 2  # hooks -> vmap -> loop, each said once
    assert relative_error(got, want) <= TOLERANCE


def test_a_forward_hook_that_changes_a_conv_output_does_not_change_the_numbers():
    model = ParameterInLoss().double().eval()
    handle = model.conv.register_forward_hook(lambda module, args, out: out * 3)
    try:
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
        want = profile_batch(model, x, y, backend="loop")
        assert relative_error(profile_batch(model, x, y, backend="hooks"), want) <= TOLERANCE
    finally:
        handle.remove()


class OwnConv(nn.Module):
    """A user layer with a registered reducer (the conv rule): served by its module hooks."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.weight = self.inner.weight
        self.bias = self.inner.bias
        self.kernel_size, self.stride, self.padding = (3, 3), (1, 1), (1, 1)
        self.dilation, self.groups, self.padding_mode, self.in_channels = (1, 1), 1, "zeros", 3

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class OwnConvNet(nn.Module):
    def __init__(self, calls: int):
        super().__init__()
        self.own = OwnConv()
        self.fc = nn.Linear(3, 5)
        self.calls = calls

    def forward(self, x):
        for _ in range(self.calls):
            x = torch.relu(self.own(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def own_conv_reducer():
    register_reducer(OwnConv, reduce_conv)
    yield
    unregister_reducer(OwnConv)


def test_a_registered_reducer_serves_its_modules_own_call(own_conv_reducer):
    model = OwnConvNet(calls=1).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    want = profile_batch(model, x, y, backend="loop")
    assert relative_error(profile_batch(model, x, y, backend="hooks"), want) <= TOLERANCE


def test_a_registered_reducer_module_called_twice_is_refused(own_conv_reducer):
    model = OwnConvNet(calls=2).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(UnsupportedModuleError, match=r"'own\.weight' is used by 2 calls .*module 'own'"):
        profile_batch(model, x, y, backend="hooks")
    want = profile_batch(model, x, y, backend="loop")
    with pytest.warns(ParamsalWarning):
        assert relative_error(profile_batch(model, x, y), want) <= TOLERANCE


def test_summing_keeps_every_sample_apart():
    """Several uses, chunked sums: each row is still its own sample's gradient."""
    model = SharedParameter().double().eval()
    x, y = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (7,))
    want = profile_batch(model, x, y, backend="loop", aggregation="abs_mean")
    got = profile_batch(model, x, y, backend="hooks", aggregation="abs_mean", chunk_size=3)
    assert relative_error(got, want) <= TOLERANCE


class _MixesInBackward(torch.autograd.Function):
    """The identity forward, a backward that adds the batch's mean gradient: samples apart forward, mixed backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad + grad.mean(0, keepdim=True)


class BackwardMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(_MixesInBackward.apply(torch.relu(self.conv(x))).mean((2, 3)))


def test_a_backward_that_mixes_samples_falls_back_to_the_loop():
    torch.manual_seed(0)
    model = BackwardMixer().double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    want = profile_batch(model, x, y, backend="loop")
    with pytest.raises(UnsupportedModuleError, match="backward pass mixes the samples"):
        profile_batch(model, x, y, backend="hooks")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(model)
        got = profiler(x, y).profiles
    assert profiler.backend != "hooks" and relative_error(got, want) <= TOLERANCE
    assert any("backward pass mixes the samples" in str(w.message) for w in caught)
