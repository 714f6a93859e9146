"""Per-sample reductions for Conv1d/2d/3d (any stride, padding, dilation, groups, bias)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, reduce_grad

if TYPE_CHECKING:
    from paramsal.engine.units import UnitGroup


def reduce_conv(layer: nn.Module, activations: torch.Tensor, backprops: torch.Tensor,
                groups: Sequence[UnitGroup], aggregation: Aggregation,
                chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of a convolution's weight and bias.

    Args:
        layer: a ``nn.Conv1d``/``Conv2d``/``Conv3d``.
        activations: the layer's input ``[B, C, *spatial_in]``.
        backprops: gradient of the summed per-sample losses w.r.t. the layer's
            output ``[B, K, *spatial_out]``; row n is the gradient of sample n's
            own loss because samples are independent in eval mode.
        groups: the units of the layer's parameters (attr "weight" or "bias").
        aggregation: "mean_abs" or "abs_mean".
        chunk_size: samples per chunk of the weight computation; None picks one
            that keeps the chunk's intermediates within a fixed budget.

    Returns:
        One ``[B, group.num_units]`` tensor per group, in order.
    """
    results = []
    for group in groups:
        if group.attr == "bias":
            results.append(reduce_grad(backprops.flatten(2).sum(2), group, aggregation))
            continue
        batch = activations.shape[0]
        chunk = chunk_size or auto_chunk(_work_per_sample(layer, backprops), batch)
        results.append(torch.cat([
            reduce_grad(conv_weight_grad_sample(layer, activations[s], backprops[s]), group, aggregation)
            for s in chunk_slices(batch, chunk)
        ]))
    return results


def conv_weight_grad_sample(layer: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a convolution.

    Args:
        layer: a ``nn.Conv1d``/``Conv2d``/``Conv3d``.
        activations: ``[b, C, *spatial_in]``.
        backprops: ``[b, K, *spatial_out]``.

    Returns:
        ``[b, K, C / groups, *kernel_size]``: each sample's gradient of the weight.
    """
    b, k = backprops.shape[:2]
    g = layer.groups
    patches = conv_patches(layer, activations)  # [b, C * prod(kernel), L]
    patches = patches.reshape(b, g, patches.shape[1] // g, patches.shape[2])
    grad_out = backprops.reshape(b, g, k // g, -1)
    grads = torch.matmul(grad_out, patches.transpose(-1, -2))  # [b, g, K/g, C/g * prod(kernel)]
    return grads.reshape(b, *layer.weight.shape)


def conv_patches(layer: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """im2col for any number of spatial dims: ``[b, C, *in] -> [b, C * prod(kernel), L]``."""
    dims = activations.dim() - 2
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if dims == 2 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return F.unfold(activations, kernel, dilation=dilation, padding=layer.padding, stride=stride)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(activations, layer._reversed_padding_repeated_twice, mode=mode)
    if dims == 2:
        return F.unfold(x, kernel, dilation=dilation, stride=stride)
    if dims == 1:
        return F.unfold(x.unsqueeze(2), (1, kernel[0]), dilation=(1, dilation[0]), stride=(1, stride[0]))
    for d in range(dims):
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
    # x: [b, C, *out, *window]; keep every dilation-th element of each window
    x = x[(...,) + tuple(slice(None, None, step) for step in dilation)]
    order = (0, 1) + tuple(range(2 + dims, 2 + 2 * dims)) + tuple(range(2, 2 + dims))
    b, c = x.shape[:2]
    return x.permute(order).reshape(b, c * math.prod(kernel), -1)


def _work_per_sample(layer: nn.Module, backprops: torch.Tensor) -> int:
    positions = math.prod(backprops.shape[2:])
    patch = layer.in_channels * math.prod(layer.kernel_size)
    return layer.weight.numel() + patch * positions
