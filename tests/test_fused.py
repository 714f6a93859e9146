"""The fused Triton kernel equals the torch path: on the GPU where there is one, else on the CPU
through Triton's interpreter (conftest.py switches it on)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import SMALL_CASES, Case, batch, build
from torch import nn

from paramsal import profile_batch
from paramsal.errors import InputError
from paramsal.kernels import fused
from paramsal.kernels.conv import conv_weight_grad_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes in float64 for tight checks; a GPU runs the kernel in float32
DTYPE, TOLERANCE = (torch.float32, 1e-5) if DEVICE == "cuda" else (torch.float64, 1e-12)

pytestmark = pytest.mark.skipif(not fused.available(torch.zeros(1, device=DEVICE)),
                                reason="needs Triton and a GPU or Triton's interpreter")


@pytest.fixture(autouse=True)
def _exact_float32(monkeypatch):
    """TF32 tiles would round float32 inputs to 10 bits; the comparisons want float32 itself."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def torch_row_abs_means(conv: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The torch path's answer, in float64: mean |per-sample weight gradient| per filter."""
    grads = conv_weight_grad_sample(conv.double(), x.cpu().double(), gy.cpu().double())
    return grads.flatten(2).abs().mean(2)


def conv_and_batch(groups, cin_per, cout_per, kernel, stride, dilation, padding, size, batch_size, dtype):
    conv = nn.Conv2d(cin_per * groups, cout_per * groups, kernel, stride=stride, padding=padding,
                     dilation=dilation, groups=groups).to(dtype)
    x = torch.randn(batch_size, cin_per * groups, *size, dtype=dtype)
    with torch.no_grad():
        gy = torch.randn_like(conv(x))
    return conv, x.to(DEVICE), gy.to(DEVICE)


def geometry_of(conv: nn.Conv2d) -> fused.Geometry:
    return fused.Geometry(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).abs().max() / want.abs().max()).item()


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), cin_per=st.integers(1, 5), cout_per=st.integers(1, 20),
       kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.integers(0, 2), h=st.integers(4, 12), w=st.integers(4, 12))
def test_kernel_equals_torch_path_on_random_conv_shapes(groups, cin_per, cout_per, kh, kw, stride, dilation,
                                                         padding, h, w):
    span_h, span_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    h, w = max(h, span_h - 2 * padding), max(w, span_w - 2 * padding)
    conv, x, gy = conv_and_batch(groups, cin_per, cout_per, (kh, kw), stride, dilation, padding, (h, w), 3,
                                 DTYPE)
    got = fused.row_abs_means(x, gy, geometry_of(conv))
    assert got.shape == (3, cout_per * groups)
    assert relative_error(got, torch_row_abs_means(conv, x, gy)) <= TOLERANCE


@pytest.mark.parametrize("dtype, tolerance", [
    (torch.float32, 1e-5), (torch.float16, 5e-3),
    pytest.param(torch.bfloat16, 3e-2, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter reads bfloat16 as raw integers")),
], ids=str)
def test_kernel_accumulates_low_precision_inputs_in_float32(dtype, tolerance):
    # more positions than one tile and more filters/columns than one block
    conv, x, gy = conv_and_batch(1, 9, 70, 3, 1, 1, 1, (9, 10), 2, dtype)
    got = fused.row_abs_means(x, gy, geometry_of(conv))
    assert got.dtype == dtype
    assert relative_error(got, torch_row_abs_means(conv, x, gy)) <= tolerance


def test_kernel_reads_strided_views_without_copies():
    conv, x, gy = conv_and_batch(1, 4, 6, 3, 1, 1, 1, (8, 8), 3, DTYPE)
    x_channels_last = x.to(memory_format=torch.channels_last)
    gy_transposed = gy.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_channels_last.is_contiguous() and not gy_transposed.is_contiguous()
    want = torch_row_abs_means(conv, x, gy)
    assert relative_error(fused.row_abs_means(x_channels_last, gy_transposed, geometry_of(conv)), want) <= TOLERANCE


@pytest.mark.parametrize("case", [c for c in SMALL_CASES if c.name in
                                  ("plain_cnn", "tiny_resnet_bn", "grouped_dilated", "conv1d", "conv3d",
                                   "mlp_linear_columns", "token_mixer_nd_linear")], ids=lambda c: c.name)
def test_hooks_with_the_kernel_equal_loop(case: Case):
    """Conv2d, Conv1d and N-D Linear layers go through the kernel; Conv3d and 2-D Linear keep their paths."""
    model = build(case, DTYPE).to(DEVICE)
    x, y = (t.to(DEVICE) for t in batch(case, 4, DTYPE))
    want = profile_batch(model, x, y, backend="loop", units=case.units)
    with fused.mode("on"):
        got = profile_batch(model, x, y, backend="hooks", units=case.units)
    scale = want.abs().amax(1, keepdim=True)
    assert ((got - want).abs() / scale).max() <= TOLERANCE


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors without the interpreter")
def test_forcing_the_kernel_without_triton_support_names_the_problem(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x, y = torch.randn(2, 2, 6, 6), torch.tensor([0, 1])
    with fused.mode("on"), pytest.raises(InputError, match="CUDA tensors"):
        profile_batch(model, x, y, backend="hooks")


def test_unknown_mode_is_refused():
    with pytest.raises(InputError, match="unknown fused-kernel mode"), fused.mode("always"):
        pass


def test_auto_mode_keeps_cpu_tensors_on_the_torch_path():
    assert not fused.wanted(torch.zeros(1))
    with fused.mode("off"):
        assert not fused.wanted(torch.zeros(1))
    with fused.mode("on"):
        assert fused.wanted(torch.zeros(1))
