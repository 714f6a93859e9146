"""Per-sample ``mean |G|`` per output channel in one fused Triton kernel (CUDA).

For sample n, a convolution's weight gradient is ``G[n] = gy[n] @ P[n]``: the
output gradient ``[K, L]`` times the im2col patches of the input ``[L, J]``.
The kernel computes a ``[BLOCK_K, BLOCK_J]`` tile of ``G[n]`` in registers,
gathering the patches straight from the input (P is never materialized),
takes ``|.|`` and sums the tile's columns. Only ``[column blocks, N, K]``
partial sums reach memory; they are added up afterwards in a fixed order,
so every run gives the same bits (no atomics, no timing-based tuning).

The same kernel serves Linear layers on N-D inputs (a 1x1 convolution over
the sequence positions) and Conv1d (a 2-D convolution of height one).

Triton comes with PyTorch's CUDA builds. Without a GPU the kernel still runs
under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test
suite checks it against the torch path on CPU. Triton reads that variable
when it is imported, so it must be set before the process starts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from paramsal.errors import InputError, ParamsalWarning, check_choice, first_line
from paramsal.kernels.tf32 import tf32_allowed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch come without Triton
    triton = None

#: The dtypes the kernel takes on a GPU, accumulating in float32. float64 stays
#: on the torch path there: most cards have no fast float64 tiles.
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Under the interpreter float64 too (accumulated in float64), for tight checks.
INTERPRETER_DTYPES = (*GPU_DTYPES, torch.float64)


@dataclass(frozen=True)
class Geometry:
    """A 2-D convolution's shape parameters, each a (height, width) pair, plus its groups."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


MODES = ("auto", "on", "off")
_modes: list[str] = []


@contextmanager
def mode(name: str) -> Iterator[None]:
    """Whether reducers use the kernel inside the block.

    ``"auto"`` (the default outside any block): on CUDA tensors of the dtypes in
    :data:`GPU_DTYPES`. ``"on"``: wherever the layer's shape allows, raising
    where Triton cannot run (used to check the kernel under the interpreter).
    ``"off"``: never, so the torch path can be measured or compared on a GPU.
    """
    check_choice("fused-kernel mode", name, MODES)
    _modes.append(name)
    try:
        yield
    finally:
        _modes.pop()


def _current_mode() -> str:
    return _modes[-1] if _modes else "auto"


def wanted(t: torch.Tensor) -> bool:
    """True where a reducer should hand ``t``'s layer to the kernel, given the current :func:`mode`."""
    current = _current_mode()
    if current == "auto":
        return preferred(t)
    return current == "on"  # where the kernel cannot run, row_abs_means raises and says why


def available(t: torch.Tensor) -> bool:
    """True where the kernel can run on ``t``: Triton installed, and a CUDA tensor or the interpreter on."""
    return triton is not None and (t.is_cuda or interpreting()) and t.dtype in _dtypes()


def preferred(t: torch.Tensor) -> bool:
    """True where the kernel is the default: a CUDA tensor of a dtype with fast tensor-core tiles."""
    return triton is not None and t.is_cuda and t.dtype in GPU_DTYPES


def _dtypes() -> tuple[torch.dtype, ...]:
    return INTERPRETER_DTYPES if interpreting() else GPU_DTYPES


def row_abs_means(x: torch.Tensor, gy: torch.Tensor, geometry: Geometry, op: str = "conv",
                  out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``[N, K]``: mean over ``j`` of ``|G[n, k, j]|`` for the conv weight gradient ``G``.

    Args:
        x: the conv input ``[N, C, H, W]``, any strides (channels-last reads coalesce: a tile's columns are
            ordered (kh, kw, channel), channel fastest).
        gy: the output gradient ``[N, K, OH, OW]``, any strides; row n is the
            gradient of sample n's own loss.
        geometry: kernel, stride, padding (zeros), dilation and groups.
        op: "conv" (a convolution) or "matmul" (a Linear layer): float32 tiles use TF32 exactly where the layer's
            own operation may (:func:`paramsal.kernels.tf32.tf32_allowed`).
        out_dtype: the result's dtype; default ``x``'s. bf16/fp16 inputs are accumulated in float32, so
            ``torch.float32`` keeps what rounding to the inputs' dtype would lose.

    Returns:
        ``[N, K]``: ``mean |G[n, k]|`` over the ``C / groups * kh * kw`` weights of filter k. None where this kernel
        variant failed to compile or launch on its first use on this device, in mode "auto": the caller takes the
        torch path (said once).
    """
    _require(x)
    if gy.dtype != x.dtype:
        gy = gy.to(x.dtype)
    n, c, h, w = x.shape
    k, oh, ow = gy.shape[1:]
    g = geometry.groups
    kh, kw = geometry.kernel
    c_per, k_per = c // g, k // g
    width = c_per * kh * kw
    block_k, block_j, block_l = _block(k_per), _block(width), _block(oh * ow)
    k_blocks, j_blocks = triton.cdiv(k_per, block_k), triton.cdiv(width, block_j)
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    precision = "tf32" if x.dtype == torch.float32 and tf32_allowed(op) else "ieee"
    variant = (str(x.device), x.dtype, kh, kw, block_k, block_j, block_l, precision)
    if variant in _broken and _current_mode() != "on":
        return None
    partial = torch.empty(j_blocks, n, k, dtype=accumulate, device=x.device)
    try:
        _kernel()[(n * g * k_blocks, j_blocks)](
            x, gy, partial, n, g, k_blocks, c_per, h, w, k_per, oh, ow, *x.stride(), *gy.stride(),
            *geometry.stride, *geometry.padding, *geometry.dilation,
            KH=kh, KW=kw, BLOCK_K=block_k, BLOCK_J=block_j, BLOCK_L=block_l,
            PRECISION=precision, ACCUMULATE=tl.float64 if accumulate == torch.float64 else tl.float32,
        )
    except Exception as exc:  # whatever Triton raises on a variant's first use: compiler, resources, driver
        if variant in _proven or _current_mode() == "on":
            raise
        _give_up(variant, exc)
        return None
    _proven.add(variant)
    return (partial.sum(0) / width).to(out_dtype or x.dtype)


#: Kernel variants (device, dtype, kernel size, tiles, precision) that compiled and ran, and those that failed on
#: their first use, with the reason: a failed variant takes the torch path for the rest of the process.
_proven: set[tuple] = set()
_broken: dict[tuple, str] = {}


def _give_up(variant: tuple, exc: Exception) -> None:
    """Marks a variant broken; the first on a device is said once, with Triton's reason."""
    first_on_device = not any(v[0] == variant[0] for v in _broken)
    _broken[variant] = f"{type(exc).__name__}: {first_line(exc)}"
    if first_on_device:
        warnings.warn(f"the fused Triton kernel failed on {variant[0]} ({_broken[variant]}); the layers it would "
                      "serve take the torch path instead (the same numbers, more slowly); fused.mode('on') raises "
                      "the error instead", ParamsalWarning, stacklevel=4)


def _require(t: torch.Tensor) -> None:
    if triton is None:
        raise InputError("the fused kernel needs Triton, which this build of torch does not include")
    if not available(t):
        raise InputError(f"the fused kernel runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1) of "
                         f"{', '.join(str(d) for d in _dtypes())}; got a {t.dtype} tensor on {t.device}")


def _block(extent: int) -> int:
    """Tile side: a power of two in [16, 64] (``tl.dot`` needs at least 16) covering ``extent`` if it can."""
    return min(64, max(16, triton.next_power_of_2(extent)))


@cache
def _kernel():
    """The jitted kernel, built on first use so that importing paramsal never compiles anything."""
    @triton.jit
    def row_abs_sums(x_ptr, gy_ptr, out_ptr, N, GROUPS, K_BLOCKS, C_PER, H, W, K_PER, OH, OW,
                     sxn, sxc, sxh, sxw, sgn, sgk, sgh, sgw,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     KH: tl.constexpr, KW: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
                     PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr):
        pid = tl.program_id(0)
        k_block = pid % K_BLOCKS
        group = (pid // K_BLOCKS) % GROUPS
        sample = (pid // K_BLOCKS // GROUPS).to(tl.int64)

        rows = k_block * BLOCK_K + tl.arange(0, BLOCK_K)  # filters within the group
        # (kh, kw, channel) within the group, channel fastest: in channels-last inputs a tile's columns are then
        # neighbours in memory, so its loads coalesce (with (channel, kh, kw) they were a channel count apart)
        cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        row_ok = rows < K_PER
        col_ok = cols < C_PER * KH * KW
        channel = group * C_PER + cols % C_PER
        tap = cols // C_PER
        tap_h = tap // KW * dil_h
        tap_w = tap % KW * dil_w
        filters = group * K_PER + rows

        gy_rows = gy_ptr + sample * sgn + filters.to(tl.int64)[:, None] * sgk
        x_cols = x_ptr + sample * sxn + channel.to(tl.int64)[None, :] * sxc

        acc = tl.zeros((BLOCK_K, BLOCK_J), dtype=ACCUMULATE)
        for start in range(0, OH * OW, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            pos_ok = pos < OH * OW
            out_h = pos // OW
            out_w = pos % OW
            grad = tl.load(gy_rows + out_h[None, :] * sgh + out_w[None, :] * sgw,
                           mask=row_ok[:, None] & pos_ok[None, :], other=0.0)
            in_h = out_h[:, None] * stride_h - pad_h + tap_h[None, :]
            in_w = out_w[:, None] * stride_w - pad_w + tap_w[None, :]
            inside = (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
            patch = tl.load(x_cols + in_h * sxh + in_w * sxw,
                            mask=pos_ok[:, None] & col_ok[None, :] & inside, other=0.0)
            acc = tl.dot(grad, patch, acc, input_precision=PRECISION, out_dtype=ACCUMULATE)

        sums = tl.sum(tl.abs(acc), axis=1)
        out = out_ptr + (tl.program_id(1) * N + sample) * (GROUPS * K_PER) + filters
        tl.store(out, sums, mask=row_ok)

    return row_abs_sums
