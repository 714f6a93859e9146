"""Reductions of per-sample gradients to per-unit saliency.

Two aggregations exist. ``"mean_abs"`` is the paper's equation 1,
``mean_{i in unit} |g_i|``. ``"abs_mean"`` is ``|mean_{i in unit} g_i|``, the
aggregation behind the statistics the authors released (saved before their
code switched to mean_abs), offered so those files can be used consistently.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from paramsal.errors import check_choice
from paramsal.options import AGGREGATIONS

Aggregation = Literal["mean_abs", "abs_mean"]


class ParamUnits(Protocol):
    """What a reduction reads of one parameter's units (:class:`paramsal.engine.units.UnitGroup` is one).

    Attributes:
        attr: the parameter's role in its layer ("weight", "bias").
        shape: the parameter's shape.
        partition: "rows", "columns" or "custom".
        num_units: how many units it carries.
        sizes: ``[num_units]`` elements per unit.
        assignment: for "custom", each element's unit (-1 for none).
    """

    @property
    def attr(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def partition(self) -> str: ...
    @property
    def num_units(self) -> int: ...
    @property
    def sizes(self) -> torch.Tensor: ...
    @property
    def assignment(self) -> torch.Tensor | None: ...


def check_aggregation(aggregation: str) -> None:
    check_choice("aggregation", aggregation, AGGREGATIONS)


def reduce_grad(grad: torch.Tensor, group: ParamUnits, aggregation: Aggregation) -> torch.Tensor:
    """Reduces per-sample gradients of one parameter to its units.

    Args:
        grad: ``[B, *param.shape]``, each row the gradient of one sample's own loss.
        group: the units of that parameter.
        aggregation: "mean_abs" or "abs_mean".

    Returns:
        ``[B, group.num_units]`` in ``grad``'s dtype.
    """
    b = grad.shape[0]
    if group.partition == "rows":
        return reduce_last(grad.reshape(b, group.num_units, -1), aggregation)
    if group.partition == "columns":
        return reduce_last(grad.reshape(b, group.shape[0], group.num_units).transpose(1, 2), aggregation)
    if group.assignment is None:
        raise ValueError(f"a {group.partition!r} partition needs an assignment of elements to units")
    return scatter_reduce(grad.reshape(b, -1), group.assignment.reshape(-1), group.sizes, aggregation)


def reduce_last(grad: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """``[..., U, S] -> [..., U]``: the aggregation over the last dim."""
    if aggregation == "mean_abs":
        return grad.abs().mean(-1)
    return grad.mean(-1).abs()


def scatter_reduce(grad: torch.Tensor, assignment: torch.Tensor, sizes: torch.Tensor,
                   aggregation: Aggregation) -> torch.Tensor:
    """The general path for arbitrary partitions.

    Args:
        grad: ``[B, P]`` flattened per-sample gradients of one parameter.
        assignment: ``[P]`` unit of each element, -1 for none.
        sizes: ``[U]`` number of elements per unit.
        aggregation: "mean_abs" or "abs_mean".

    Returns:
        ``[B, U]``.
    """
    keep = assignment >= 0
    index = assignment[keep].to(grad.device)
    values = grad[:, keep.to(grad.device)]
    if aggregation == "mean_abs":
        values = values.abs()
    sums = grad.new_zeros(grad.shape[0], sizes.numel()).index_add_(1, index, values)
    means = sums / sizes.to(grad.device, grad.dtype)
    return means if aggregation == "mean_abs" else means.abs()


def accumulated(t: torch.Tensor) -> torch.dtype:
    """The dtype a reduction of ``t`` comes out in: float32 for a bf16/fp16 forward's tensors, else ``t``'s."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class FullPrecision:
    """A layer's captured input and output gradient as the torch paths take them: float32 copies of a bf16/fp16
    forward's tensors, made once and only when a path needs them (the fused kernel takes them as they are)."""

    def __init__(self, activations: torch.Tensor, backprops: torch.Tensor):
        self.captured = activations, backprops
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._full is None:
            x, gy = (t.to(accumulated(t)) for t in self.captured)
            self._full = x, gy
        return self._full
