"""Per-sample reductions for Conv1d/2d/3d (any stride, padding, dilation, groups, bias)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from paramsal.errors import check_choice
from paramsal.kernels import fused
from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, FullPrecision, ParamUnits, accumulated, reduce_grad
from paramsal.kernels.tiles import tile_abs_means

#: A layer goes the tiled way when its maps have at most this many output
#: positions, or its filters at most this many weights per output channel:
#: then writing whole per-sample gradients out costs more than computing them.
#: Measured on resnet18-CIFAR and the demo CNN (2-core CPU, batch 64), per
#: layer, tiled vs grouped in ms: resnet 1x32x32 stem 3.6 vs 9.3, 16x16 maps
#: (256 positions) 33 vs 32, 8x8 maps 35 vs 64, 4x4 maps 47 vs 190; demo CNN
#: 14x14 maps 3.1 vs 1.6, 7x7 maps 2.9 vs 3.0. A fixed rule keeps every
#: run's numbers identical to the last bit.
TILED_MAX_POSITIONS = 64
TILED_MAX_WIDTH = 64

#: Depthwise convolutions (one filter per group) go the grouped way: their per-sample gradient (49 weights per
#: channel for 7x7) is far smaller than their patches, whose copy would dominate. On maps of at most this many
#: positions ("same" zero padding, stride 1) the gradient is a correlation of a few shifts instead
#: (:func:`small_map_depthwise_units`), faster there than grouped and slower from 4x4 maps on; the crossover was
#: measured on ConvNeXt-tiny's 7x7 layers (``paramsal bench --case convnext-tiny``, docs/results.md).
SMALL_MAP_POSITIONS = 4


@dataclass(frozen=True)
class ConvCall:
    """The geometry of one ``F.conv1d/2d/3d`` call, under the attribute names of ``nn.ConvNd`` the reducers read.

    A convolution's per-sample rule depends only on the call, not on the module
    that made it, so a weight used through ``F.conv2d`` (or by a module called
    twice, or shared between modules) is served by the same kernels.
    """

    weight: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])


class ConvLayer(Protocol):
    """What the conv reducers read of a layer: a ``nn.Conv1d/2d/3d`` (its own forward) or a :class:`ConvCall`."""

    @property
    def weight(self) -> torch.Tensor: ...
    @property
    def stride(self) -> tuple[int, ...]: ...
    @property
    def padding(self) -> str | tuple[int, ...]: ...
    @property
    def dilation(self) -> tuple[int, ...]: ...
    @property
    def groups(self) -> int: ...
    @property
    def padding_mode(self) -> str: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def kernel_size(self) -> tuple[int, ...]: ...


def conv_call(args: tuple, kwargs: dict[str, Any]) -> tuple[ConvCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Parses ``conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)``.

    Returns:
        The call's geometry, its input (zero-padded here when ``padding="same"``
        needs more on one side than the other, as the module does) and its
        parameters by role, ``{"weight": ..., "bias": ...}``.
    """
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound: dict[str, Any] = {**dict(zip(names, args)), **kwargs}
    x, weight = bound["input"], bound["weight"]
    dims = weight.dim() - 2
    stride, dilation = _tuple(bound.get("stride", 1), dims), _tuple(bound.get("dilation", 1), dims)
    padding = bound.get("padding", 0)
    if padding == "valid":
        padding = 0
    if padding == "same":
        sides = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, weight.shape[2:])]
        if any(left != right for left, right in sides):
            x = F.pad(x, [p for side in reversed(sides) for p in side])
            padding = 0
        else:
            padding = tuple(left for left, _ in sides)
    call = ConvCall(weight, stride, _tuple(padding, dims), dilation, int(bound.get("groups", 1)))
    return call, x, {"weight": weight, "bias": bound.get("bias")}


def conv_grad_sample(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor,
                     attr: str) -> torch.Tensor:
    """Each sample's whole gradient of the conv's ``weight`` or ``bias``: ``[b, *param.shape]``.

    For a parameter with several uses, whose per-sample gradients must be
    summed before the ``|.|`` of a reduction.
    """
    if attr == "bias":
        return backprops.flatten(2).sum(2)
    return conv_weight_grad_sample(layer, activations, backprops)


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * dims  # type: ignore[arg-type]  # an int (or a 0-d SymInt), by the branch above


def reduce_conv(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor,
                groups: Sequence[ParamUnits], aggregation: Aggregation,
                chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of a convolution's weight and bias.

    Args:
        layer: a ``nn.Conv1d``/``Conv2d``/``Conv3d`` or the :class:`ConvCall` of a functional use.
        activations: the layer's input ``[B, C, *spatial_in]``.
        backprops: gradient of the summed per-sample losses w.r.t. the layer's
            output ``[B, K, *spatial_out]``; row n is the gradient of sample n's
            own loss because samples are independent in eval mode.
        groups: the units of the layer's parameters (attr "weight" or "bias").
        aggregation: "mean_abs" or "abs_mean".
        chunk_size: samples per chunk of the weight computation; None picks one
            that keeps the chunk's intermediates within the device's
            :func:`~paramsal.kernels.chunks.memory_budget`.

    Returns:
        One ``[B, group.num_units]`` tensor per group, in order.
    """
    results = []
    full = FullPrecision(activations, backprops)
    for group in groups:
        fast = _fusable(layer, group, aggregation) and fused.wanted(activations)
        units = fused_weight_units(layer, activations, backprops) if fast else None
        if units is not None:
            results.append(units)
            continue
        x, gy = full.tensors()
        if group.attr == "bias":
            results.append(reduce_grad(gy.flatten(2).sum(2), group, aggregation))
        elif group.partition == "rows" and aggregation == "abs_mean":
            results.append(row_means(layer, x, gy).abs())
        else:
            strategy = _strategy(layer, x, gy, group, aggregation)
            results.append(strategy(layer, x, gy, group, aggregation, chunk_size))
    return results


def row_means(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` mean of each filter's per-sample weight gradient, without forming the gradient.

    Summing ``G[n] = gy[n] @ P[n]`` over a filter's weights sums each row of
    the patches ``P[n]`` first: that is a convolution of the input with an
    all-ones kernel (one output channel per group), so the row means cost one
    cheap convolution and a batched matrix-vector product.
    """
    x, padding = _padded(layer, activations)
    b, k = backprops.shape[:2]
    g = layer.groups
    ones = x.new_ones(g, layer.in_channels // g, *layer.kernel_size)
    window_sums = torch.convolution(x, ones, None, layer.stride, padding, layer.dilation, False,
                                    (0,) * len(padding), g)  # [B, g, *spatial_out]
    sums = torch.matmul(backprops.reshape(b, g, k // g, -1), window_sums.reshape(b, g, -1, 1))
    return sums.view(b, k) / layer.weight[0].numel()


def grouped_weight_units(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor, group: ParamUnits,
                         aggregation: Aggregation, chunk_size: int | None) -> torch.Tensor:
    """``[B, U]`` from whole per-sample weight gradients (any partition), a chunk of samples at a time."""
    batch = activations.shape[0]
    chunk = chunk_size or auto_chunk(2 * layer.weight.numel(), batch, activations)
    return torch.cat([reduce_grad(conv_weight_grad_sample(layer, activations[s], backprops[s]), group, aggregation)
                      for s in chunk_slices(batch, chunk)])


def tiled_weight_units(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor, group: ParamUnits,
                       aggregation: Aggregation, chunk_size: int | None) -> torch.Tensor:
    """``[B, K]`` mean ``|G|`` per output channel (rows, mean_abs only) from cache-sized gradient tiles."""
    batch = activations.shape[0]
    patch = layer.in_channels * math.prod(layer.kernel_size) * math.prod(backprops.shape[2:])
    chunk = chunk_size or auto_chunk(patch, batch, activations)
    return torch.cat([_tiled_mean_abs(layer, activations[s], backprops[s]) for s in chunk_slices(batch, chunk)])


def small_map_depthwise_units(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor,
                              group: ParamUnits, aggregation: Aggregation, chunk_size: int | None) -> torch.Tensor:
    """``[B, K]`` mean ``|G|`` per filter of a depthwise 2-D conv with "same" zero padding on maps of a few positions.

    Weight ``(i, j)`` sees the input shifted by ``(i - P, j - P)``; on an ``H x W`` map only the ``(2H-1) x (2W-1)``
    central shifts see any input (the others' gradient is exactly 0), so ``G`` is the full correlation of input
    and output gradient cut to the kernel, not ``K x K`` patches per position.
    """
    b, c, h, w = activations.shape
    kh, kw = layer.kernel_size
    ph, pw = (int(p) for p in layer.padding)
    padded = F.pad(activations, (w - 1, w - 1, h - 1, h - 1))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 2H-1, 2W-1, H, W]
    full = torch.einsum("ncabhw,nchw->ncab", windows, backprops)
    kept = full[:, :, max(0, h - 1 - ph):h - 1 - ph + kh, max(0, w - 1 - pw):w - 1 - pw + kw]
    return kept.abs().flatten(2).sum(2) / (kh * kw)


def single_position_units(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor,
                          group: ParamUnits, aggregation: Aggregation, chunk_size: int | None) -> torch.Tensor:
    """``[B, K]`` mean ``|G|`` per filter of a pointwise conv from one input to one output position (a
    squeeze-and-excitation block's, a head's on a 1x1 map): ``G[n, k, j] = gy[n, k] x[n, j]`` is rank one, so
    the mean of ``|G|`` over a filter is ``|gy[n, k]|`` times the mean ``|x|`` of its group's channels."""
    b, k = backprops.shape[:2]
    g = layer.groups
    inputs = activations.reshape(b, g, -1).abs().mean(2, keepdim=True)  # [B, g, 1]
    return (backprops.reshape(b, g, k // g).abs() * inputs).reshape(b, k)


STRATEGIES = {"grouped": grouped_weight_units, "tiled": tiled_weight_units}

_forced: list[str] = []


@contextmanager
def conv_strategy(name: str) -> Iterator[None]:
    """Forces one way of computing conv weight units ("grouped" or "tiled") inside the block (tests, benchmarks)."""
    check_choice("conv strategy", name, STRATEGIES)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _strategy(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor, group: ParamUnits,
              aggregation: Aggregation):
    """Grouped weight-gradient convolution for large maps and wide filters, gradient tiles otherwise."""
    if group.partition != "rows" or aggregation != "mean_abs":
        return grouped_weight_units
    if _forced:
        return STRATEGIES[_forced[-1]]
    positions = math.prod(backprops.shape[2:])
    if _pointwise(layer) and positions == 1 and math.prod(activations.shape[2:]) == 1:
        return single_position_units
    if _small_map_depthwise(layer, activations, backprops, positions):
        return small_map_depthwise_units
    if layer.weight.shape[0] == layer.groups and positions > 1:
        return grouped_weight_units  # one filter per group (depthwise): its gradient is smaller than its patches
    width = layer.weight[0].numel()
    return tiled_weight_units if positions <= TILED_MAX_POSITIONS or width <= TILED_MAX_WIDTH else grouped_weight_units


def _pointwise(layer: ConvLayer) -> bool:
    """A 1x1 (x1) kernel with no padding: each output position reads one input position."""
    return (all(k == 1 for k in layer.kernel_size) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and not any(layer.padding))


def _small_map_depthwise(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor,
                         positions: int) -> bool:
    """A depthwise 2-D conv (one input and one output channel per group), stride and dilation 1, zero padding
    that keeps the map's size, on maps of at most :data:`SMALL_MAP_POSITIONS` positions."""
    padding = layer.padding
    return (layer.weight.dim() == 4 and layer.weight.shape[0] == layer.groups == layer.in_channels
            and positions <= SMALL_MAP_POSITIONS and layer.padding_mode == "zeros" and not isinstance(padding, str)
            and tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and tuple(activations.shape[2:]) == tuple(backprops.shape[2:]))


def _fusable(layer: ConvLayer, group: ParamUnits, aggregation: Aggregation) -> bool:
    """The fused kernel computes mean ``|G|`` per filter of 1-D and 2-D convolutions' weights."""
    return (group.attr == "weight" and group.partition == "rows" and aggregation == "mean_abs"
            and layer.weight.dim() in (3, 4))


def fused_weight_units(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor | None:
    """``[B, K]`` mean ``|G|`` per filter from the fused Triton kernel; a Conv1d is a 2-D conv of height one.

    None where the kernel failed on this device (:func:`paramsal.kernels.fused.row_abs_means`)."""
    x, padding = _padded(layer, activations)
    dtype = accumulated(x)
    if x.dim() == 3:
        geometry = fused.Geometry((1, *layer.kernel_size), (1, *layer.stride), (0, *padding), (1, *layer.dilation),
                                  layer.groups)
        return fused.row_abs_means(x.unsqueeze(2), backprops.unsqueeze(2), geometry, out_dtype=dtype)
    geometry = fused.Geometry(tuple(layer.kernel_size), tuple(layer.stride), padding, tuple(layer.dilation),
                              layer.groups)
    return fused.row_abs_means(x, backprops, geometry, out_dtype=dtype)


def conv_weight_grad_sample(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a convolution.

    The batch is folded into the channels and the weight gradient of a conv
    with ``batch * groups`` groups is asked for: each sample's gradient is then
    one group's, computed by the library's own weight-gradient kernel.

    Args:
        layer: a ``nn.Conv1d``/``Conv2d``/``Conv3d``.
        activations: ``[b, C, *spatial_in]``.
        backprops: ``[b, K, *spatial_out]``.

    Returns:
        ``[b, K, C / groups, *kernel_size]``: each sample's gradient of the weight.
    """
    b = activations.shape[0]
    x, padding = _padded(layer, activations)
    weight = layer.weight
    folded_weight = weight.new_empty(b * weight.shape[0], *weight.shape[1:])
    _, grads, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, -1, *backprops.shape[2:]), x.reshape(1, -1, *x.shape[2:]), folded_weight,
        None, layer.stride, padding, layer.dilation, False, (0,) * len(padding), b * layer.groups,
        [False, True, False])
    return grads.view(b, *weight.shape)


def _padded(layer: ConvLayer, activations: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input with any padding the conv kernel cannot express applied: (input, remaining padding)."""
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return activations, tuple(layer.padding)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    # A module's own padding, in F.pad's order; only modules get here (a call's padding is zeros, in numbers).
    pads = getattr(layer, "_reversed_padding_repeated_twice")
    return F.pad(activations, pads, mode=mode), (0,) * (activations.dim() - 2)


def _tiled_mean_abs(layer: ConvLayer, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """``[b, K]`` mean ``|G|`` per output channel of a convolution, from its patches (:func:`tile_abs_means`)."""
    b, k = backprops.shape[:2]
    g = layer.groups
    columns = conv_patch_columns(layer, activations)  # [b, C * prod(kernel), L]
    positions = columns.shape[2]
    return tile_abs_means(columns.view(b, g, -1, positions), backprops.reshape(b, g, k // g, positions)).view(b, k)


def conv_patch_columns(layer: ConvLayer, activations: torch.Tensor) -> torch.Tensor:
    """im2col for any number of spatial dims, one column per output position: ``[b, C * prod(kernel), L]``.

    Built from strided windows of the padded input and a single copy. The copy
    runs along output positions, contiguous in the input, which measured
    faster than ``F.unfold`` and than the same copy with the window innermost
    (on resnet18-CIFAR's 8x8 maps), and it takes any number of dims and dilation.
    """
    if _pointwise(layer) and all(s == 1 for s in layer.stride):
        return activations.reshape(*activations.shape[:2], -1)  # the input itself: no windows, no copy
    x, padding = _padded(layer, activations)
    dims = x.dim() - 2
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    for d in range(dims):
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
    # x: [b, C, *out, *window]; keep every dilation-th element of each window
    x = x[(...,) + tuple(slice(None, None, step) for step in dilation)]
    order = (0, 1) + tuple(range(2 + dims, 2 + 2 * dims)) + tuple(range(2, 2 + dims))
    b, c = x.shape[:2]
    return x.permute(order).reshape(b, c * math.prod(kernel), -1)
