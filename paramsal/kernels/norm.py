"""Per-sample reductions for the affine parameters of BatchNorm (eval), LayerNorm, GroupNorm and RMSNorm.

Each layer computes ``y = x_hat * weight + bias`` with ``x_hat`` its
normalized input, so sample n's gradients are ``sum g * x_hat`` and ``sum g``
over everything but the parameter's own dimensions. ``x_hat`` is formed again
from the saved input the way the layer formed it: with the running statistics
(BatchNorm in eval mode), over each position's last dims (LayerNorm; RMSNorm,
which divides by the root mean square without centring), or over each
sample's channel groups (GroupNorm). A BatchNorm that normalizes with the
batch's own statistics mixes samples and is not served.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from paramsal.kernels.reduce import Aggregation, ParamUnits, reduce_grad


@dataclass(frozen=True)
class NormCall:
    """One served normalization: how to form ``x_hat`` from the input, and which dims the parameters span."""

    kind: str
    eps: float
    shape: tuple[int, ...] = ()
    groups: int = 1
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None


def _bound(function: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def batch_norm_call(args: tuple, kwargs: dict[str, Any]
                    ) -> tuple[NormCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    given = _bound(F.batch_norm, args, kwargs)
    served = not given["training"] and given["running_mean"] is not None and given["running_var"] is not None
    call = NormCall("batch", given["eps"], mean=given["running_mean"], var=given["running_var"])
    return call, given["input"], {"weight": given["weight"], "bias": given["bias"]} if served else {}


def layer_norm_call(args: tuple, kwargs: dict[str, Any]
                    ) -> tuple[NormCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    given = _bound(F.layer_norm, args, kwargs)
    call = NormCall("layer", given["eps"], shape=tuple(given["normalized_shape"]))
    return call, given["input"], {"weight": given["weight"], "bias": given["bias"]}


def rms_norm_call(args: tuple, kwargs: dict[str, Any]
                  ) -> tuple[NormCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    given = _bound(F.rms_norm, args, kwargs)
    eps = given["eps"] if given["eps"] is not None else torch.finfo(given["input"].dtype).eps  # F.rms_norm's default
    call = NormCall("rms", eps, shape=tuple(given["normalized_shape"]))
    return call, given["input"], {"weight": given["weight"]}


def group_norm_call(args: tuple, kwargs: dict[str, Any]
                    ) -> tuple[NormCall, torch.Tensor, dict[str, torch.Tensor | None]]:
    given = _bound(F.group_norm, args, kwargs)
    call = NormCall("group", given["eps"], groups=given["num_groups"])
    return call, given["input"], {"weight": given["weight"], "bias": given["bias"]}


def norm_grad_sample(call: NormCall, activations: torch.Tensor, backprops: torch.Tensor, attr: str) -> torch.Tensor:
    """Each sample's whole gradient of ``weight`` or ``bias``: ``[B, *param.shape]``."""
    per_element = backprops if attr == "bias" else backprops * _normalized(call, activations)
    if call.kind in ("layer", "rms"):  # the parameters span the last dims: sum over every position before them
        return per_element.reshape(len(per_element), -1, *call.shape).sum(1)
    return per_element.reshape(*per_element.shape[:2], -1).sum(2)  # channels: sum over the spatial dims


def reduce_norm(call: NormCall, activations: torch.Tensor, backprops: torch.Tensor, groups: Sequence[ParamUnits],
                aggregation: Aggregation, chunk_size: int | None = None) -> list[torch.Tensor]:
    """Per-sample, per-unit saliency of the layer's weight and bias (their whole gradients are small)."""
    return [reduce_grad(norm_grad_sample(call, activations, backprops, g.attr), g, aggregation) for g in groups]


def _normalized(call: NormCall, x: torch.Tensor) -> torch.Tensor:
    if call.kind == "batch":
        assert call.mean is not None and call.var is not None
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - call.mean.reshape(view)) / torch.sqrt(call.var.reshape(view) + call.eps)
    if call.kind in ("layer", "rms"):
        dims = tuple(range(x.dim() - len(call.shape), x.dim()))
        if call.kind == "rms":
            return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + call.eps)
        mean = x.mean(dims, keepdim=True)
        return (x - mean) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + call.eps)
    grouped = x.reshape(len(x), call.groups, -1)
    mean = grouped.mean(2, keepdim=True)
    return ((grouped - mean) / torch.sqrt(grouped.var(2, unbiased=False, keepdim=True) + call.eps)).reshape(x.shape)
