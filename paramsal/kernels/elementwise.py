"""Per-sample reductions for a parameter added to, or multiplied with, a batch: position embeddings, layer scales.

``x + p`` and ``x * p`` (``torch.add``/``torch.mul`` and the Tensor methods
and operators) with ``x`` a batch ``[N, ...]`` and ``p`` broadcast over its
samples (``p``'s first broadcast dimension has size 1): sample n's gradient of
``p`` is its output gradient (times ``x[n]`` for a product) summed over the
dimensions ``p`` is broadcast along. A ViT's ``x + pos_embedding``, ConvNeXt's
``layer_scale * x`` and timm's ``x * gamma`` are such calls. Any other call
with a unit parameter (``2 * weight``, a parameter broadcast over the batch's
own dimension, ``alpha != 1``) is not served, so the hooks backend refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paramsal.kernels.reduce import Aggregation, ParamUnits, reduce_grad


@dataclass(frozen=True)
class ElementwiseCall:
    """One served call: the parameter's shape, and whether the batch multiplies it (else it is added)."""

    shape: tuple[int, ...]
    multiplies: bool


def _call(args: tuple, kwargs: dict[str, Any], multiplies: bool
          ) -> tuple[ElementwiseCall | None, Any, dict[str, torch.Tensor | None]]:
    given = list(args[:2]) + ([kwargs["other"]] if "other" in kwargs and len(args) < 2 else [])
    extra = args[2:] or {k: v for k, v in kwargs.items() if k != "other"}
    if len(given) != 2 or extra or sum(isinstance(t, nn.Parameter) for t in given) != 1:
        return None, None, {}
    param, batch = given if isinstance(given[0], nn.Parameter) else given[::-1]
    if not isinstance(batch, torch.Tensor) or batch.dim() < 1 or param.dim() > batch.dim():
        return None, batch, {}
    full = (1,) * (batch.dim() - param.dim()) + tuple(param.shape)
    if full[0] != 1 or torch.broadcast_shapes(full, batch.shape) != batch.shape:
        return None, batch, {}
    return ElementwiseCall(tuple(param.shape), multiplies), batch, {"weight": param}


def add_call(args: tuple, kwargs: dict[str, Any]) -> tuple[ElementwiseCall | None, Any, dict]:
    """Parses ``add(input, other)`` (no ``alpha``): the call, the batch, the parameter."""
    return _call(args, kwargs, multiplies=False)


def mul_call(args: tuple, kwargs: dict[str, Any]) -> tuple[ElementwiseCall | None, Any, dict]:
    """Parses ``mul(input, other)``: the call, the batch, the parameter."""
    return _call(args, kwargs, multiplies=True)


def elementwise_grad_sample(call: ElementwiseCall, activations: torch.Tensor, backprops: torch.Tensor,
                            attr: str) -> torch.Tensor:
    """Each sample's whole gradient of the parameter, ``[B, *shape]``."""
    grad = backprops * activations if call.multiplies else backprops
    full = (1,) * (grad.dim() - len(call.shape)) + call.shape
    spread = [d for d in range(1, grad.dim()) if full[d] == 1 and grad.shape[d] != 1]
    summed = grad.sum(spread, keepdim=True) if spread else grad
    return summed.reshape(len(grad), *call.shape)


def reduce_elementwise(call: ElementwiseCall, activations: torch.Tensor, backprops: torch.Tensor,
                       groups: Sequence[ParamUnits], aggregation: Aggregation,
                       chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of the parameter (its gradient is as small as the parameter)."""
    grad = elementwise_grad_sample(call, activations, backprops, "weight")
    return [reduce_grad(grad, group, aggregation) for group in groups]
