"""Reduced precision (bf16/fp16 under autocast) and channels-last layout.

Tolerances are in units of the lowered dtype's unit roundoff u (2**-8 for
bf16, 2**-11 for fp16), relative to each sample's largest unit. Backends
agree to 4u: the loop and vmap backends round every weight gradient to the
lowered dtype (up to u each) where hooks contract float32 copies, and a
batched and a one-sample forward may round a value to neighbouring lowered
numbers; a unit's mean over few elements keeps up to about u of that. Measured
maxima over the test networks (8 samples each): bf16 2.2e-3 (hooks - loop),
7.7e-3 (vmap - loop); fp16 3.0e-4, 1.1e-3. Against the float64 reference
the bound is on the median over samples, since a ReLU or max-pool input
within one rounding of its threshold switches a whole path and moves that
sample's profile by O(1) (``scripts/precision_error.py`` prints the table).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import SMALL_CASES, Case, GroupedDilated, PlainCNN, SharedParameter, TinyResNet, batch, build
from torch import nn

from paramsal import Profiler, profile_batch, units_of
from paramsal.engine import functional
from paramsal.errors import InputError, NonFiniteError
from paramsal.kernels.conv import conv_strategy
from paramsal.reference.profiles import reference_profiles

BACKENDS = ["hooks", "vmap", "loop"]
ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
AGREE = {name: 4 * u for name, u in ROUNDOFF.items()}


def sample_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``[N]``: each sample's largest error relative to its largest unit."""
    scale = want.abs().amax(1).clamp_min(torch.finfo(want.dtype).tiny)
    return (got.to(want.dtype) - want).abs().amax(1) / scale


class Smooth(nn.Module):
    """Conv, BatchNorm, tanh, strided conv, Linear: no threshold a rounding could flip."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.bn(self.conv1(x))))).mean((2, 3)))


SMOOTH = Case("smooth", Smooth, (3, 9, 9), "conv+linear")
# One Parameter used by two convs: autocast must cast it at each use (no weight cache).
SHARED = Case("shared", SharedParameter, (3, 8, 8))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["hooks", "vmap"])
@pytest.mark.parametrize("case", [SMOOTH, SHARED], ids=lambda c: c.name)
def test_reduced_precision_backends_equal_loop(case: Case, backend: str, precision: str):
    model = build(case, torch.float32)
    x, y = batch(case, 6, torch.float32)
    want = profile_batch(model, x, y, backend="loop", units=case.units, precision=precision)
    got = profile_batch(model, x, y, backend=backend, units=case.units, precision=precision, chunk_size=4)
    assert sample_errors(got, want).max() <= AGREE[precision]


@pytest.mark.parametrize("backend", ["hooks", "vmap"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_bf16_backends_equal_loop_on_the_test_networks(case: Case, backend: str):
    """All samples but at most one (a threshold flip between the batched and one-sample forward) within 4u."""
    model = build(case, torch.float32)
    x, y = batch(case, 8, torch.float32)
    want = profile_batch(model, x, y, backend="loop", units=case.units, precision="bf16")
    got = profile_batch(model, x, y, backend=backend, units=case.units, precision="bf16")
    assert (sample_errors(got, want) > AGREE["bf16"]).sum() <= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("make", [TinyResNet, GroupedDilated], ids=lambda m: m.__name__)
def test_reduced_precision_error_against_the_float64_reference_is_bounded(make, precision: str):
    """Median over samples within 4u of the float64 oracle (measured here: 1.4u-1.8u bf16, 1.0u-1.3u fp16)."""
    case = next(c for c in SMALL_CASES if c.make is make)
    model = build(case, torch.float32)
    x, y = batch(case, 16, torch.float32)
    reference = copy.deepcopy(model).double()
    want = reference_profiles(reference, x.double(), y, units_of(reference, case.units))
    got = profile_batch(model, x, y, units=case.units, precision=precision)
    errors = sample_errors(got, want)
    assert errors.median() <= AGREE[precision]
    float32 = sample_errors(profile_batch(model, x, y, units=case.units), want)
    assert float32.max() <= 1e-4 < errors.median()  # the bound is the precision's, not the method's


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_float32(backend: str, precision: str):
    case = SMALL_CASES[0]
    model = build(case, torch.float32)
    x, y = batch(case, 3, torch.float32)
    result = Profiler(model, backend=backend, precision=precision, features=True)(x, y)
    assert result.profiles.dtype == result.losses.dtype == result.outputs.dtype == torch.float32
    assert result.features is not None and result.features.dtype == torch.float32
    assert torch.isfinite(result.profiles).all() and result.profiles.abs().max() > 0


def test_a_float64_model_is_refused_with_one_line():
    model = build(SMALL_CASES[0], torch.float64)
    with pytest.raises(InputError, match="precision='bf16'.*float64") as info:
        Profiler(model, precision="bf16")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="precision"):
        Profiler(build(SMALL_CASES[0], torch.float32), precision="float16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_loss_scale_keeps_small_gradients(backend: str, monkeypatch: pytest.MonkeyPatch):
    """Gradients 2**-14 times cross-entropy's (a sample right with probability 1 - 1e-5) underflow fp16 unscaled."""
    model = build(SMOOTH, torch.float32)
    x, y = batch(SMOOTH, 4, torch.float32)

    def small(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none") * 2.0**-14

    want = profile_batch(model, x, y, backend=backend, loss=small)
    got = profile_batch(model, x, y, backend=backend, loss=small, precision="fp16")
    assert sample_errors(got, want).max() <= AGREE["fp16"]
    monkeypatch.setattr(functional, "FP16_LOSS_SCALE", 1.0)
    unscaled = profile_batch(model, x, y, backend=backend, loss=small, precision="fp16")
    assert sample_errors(unscaled, want).max() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_overflow_is_flagged_as_nonfinite(backend: str):
    model = build(SMOOTH, torch.float32)
    x, y = batch(SMOOTH, 3, torch.float32)

    def large(outputs, targets):  # logit gradients near 2**9, 2**17 once scaled: over fp16's 65504
        return F.cross_entropy(outputs, targets, reduction="none") * 2.0**9

    profiler = Profiler(model, backend=backend, loss=large, precision="fp16")
    flags = profiler.nonfinite(profiler(x, y, check_finite=False))
    assert all(flag is not None for flag in flags)
    with pytest.raises(NonFiniteError):
        profiler(x, y)
    bf16 = Profiler(model, backend=backend, loss=large, precision="bf16")(x, y)  # float32's range
    assert torch.isfinite(bf16.profiles).all()


CHANNELS_LAST_CASES = [c for c in SMALL_CASES if c.make in (PlainCNN, TinyResNet, GroupedDilated)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=lambda c: c.name)
def test_channels_last_equals_the_default_layout(case: Case, backend: str):
    """Equal to float32 rounding of differently ordered sums (measured <= 3e-7)."""
    x, y = batch(case, 5, torch.float32)
    want = profile_batch(build(case, torch.float32), x, y, backend=backend, units=case.units)
    model = build(case, torch.float32)
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    got = profile_batch(model, x, y, backend=backend, units=case.units, channels_last=True)
    assert sample_errors(got, want).max() <= 1e-5
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name])
        assert p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("strategy", ["grouped", "tiled"])
@pytest.mark.parametrize("aggregation", ["mean_abs", "abs_mean"])
def test_channels_last_through_each_conv_path(strategy: str, aggregation: str, chunk_size: int | None):
    """Each conv reducer path (grouped, tiled, row means; one sample or several) on channels-last tensors."""
    case = next(c for c in SMALL_CASES if c.make is GroupedDilated)
    x, y = batch(case, 4, torch.float32)
    want = profile_batch(build(case, torch.float32), x, y, backend="loop", units=case.units,
                         aggregation=aggregation)
    with conv_strategy(strategy):
        got = profile_batch(build(case, torch.float32), x, y, backend="hooks", units=case.units,
                            aggregation=aggregation, channels_last=True, chunk_size=chunk_size)
    assert sample_errors(got, want).max() <= 1e-5


def test_channels_last_leaves_other_ranks_alone():
    case = next(c for c in SMALL_CASES if c.name == "conv3d")
    x, y = batch(case, 3, torch.float32)
    want = profile_batch(build(case, torch.float32), x, y, units=case.units)
    got = profile_batch(build(case, torch.float32), x, y, units=case.units, channels_last=True)
    assert sample_errors(got, want).max() <= 1e-5


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_is_clean_after_a_call(backend: str):
    case = SMALL_CASES[0]
    model = build(case, torch.float32)
    x, y = batch(case, 3, torch.float32)
    for precision in ("bf16", "fp16"):
        Profiler(model, backend=backend, precision=precision)(x, y)
        failing = Failing()
        with pytest.raises(InputError, match="boom"):
            Profiler(failing, backend=backend, precision=precision)(x, y)
        for module in (*model.modules(), *failing.modules()):
            assert not module._forward_hooks and not module._forward_pre_hooks
            assert not module._backward_hooks and not module._backward_pre_hooks
        assert not torch.is_autocast_enabled("cpu") and torch._C._len_torch_function_stack() == 0
        assert all(p.dtype == torch.float32 and p.grad is None and p.requires_grad for p in model.parameters())
        assert model.training is False and all(p._backward_hooks is None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_enclosing_autocast_does_not_leak_into_float32(backend: str):
    case = SMALL_CASES[2]  # BatchNorm, residual
    model = build(case, torch.float32)
    x, y = batch(case, 3, torch.float32)
    want = Profiler(model, backend=backend)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Profiler(model, backend=backend)(x, y)
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(got.profiles, want.profiles) and torch.equal(got.outputs, want.outputs)
