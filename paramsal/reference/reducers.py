"""``check_reducer``: proves a reducer right against the one-sample reference, in one call.

Whoever registers a reducer for a layer of their own
(:func:`paramsal.kernels.register_reducer`) can check it the way paramsal
checks its own: the hooks backend (with the reducer) against
:func:`~paramsal.reference.profiles.reference_profiles` (one sample and one
unit at a time), in float64, for every parameter the reducer claims.
"""

from __future__ import annotations

import dataclasses
from typing import get_args

import torch
from torch import nn

from paramsal.engine.profile import profile_batch
from paramsal.engine.units import UnitIndex, units_of
from paramsal.errors import InputError
from paramsal.kernels.reduce import Aggregation
from paramsal.kernels.registry import find_reducer
from paramsal.reference.profiles import reference_profiles


def check_reducer(module: nn.Module, inputs: torch.Tensor, *, rtol: float = 1e-9, seed: int = 0) -> float:
    """Checks the reducer registered for ``module``'s type on ``inputs``, for both aggregations.

    The module is wrapped with a fixed random per-sample loss (a dot product
    of each sample's output with a seeded random tensor), so any layer fits;
    every parameter the reducer claims becomes one unit per row (index of its
    first dim). The check runs on float64 copies of the module and inputs.

    Args:
        module: an instance of the layer, e.g. ``MyConv(3, 8, 3)``.
        inputs: ``[N, ...]`` a batch the layer takes (N >= 2 shows that samples stay apart).
        rtol: the largest error allowed, relative to each sample's largest unit value.
        seed: seeds the loss's random tensor.

    Returns:
        The largest relative error found.

    Raises:
        InputError: when no reducer is registered for the module's type.
        AssertionError: naming the aggregation, sample and unit where the reducer is wrong.
    """
    entry = find_reducer(module)
    if entry is None:
        raise InputError(f"no reducer is registered for {type(module).__qualname__} (or its forward differs from "
                         "the registered base's); register one with paramsal.kernels.register_reducer first")
    layer = _Wrapped(module).double()
    x = inputs.detach().double() if inputs.is_floating_point() else inputs
    with torch.no_grad():
        shape = layer(x[:1]).shape[1:]
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs * weights).flatten(1).sum(1)

    index = _row_units(layer, entry.params)
    targets = torch.zeros(len(x))
    worst = 0.0
    for aggregation in get_args(Aggregation):
        want = reference_profiles(layer, x, targets, index, aggregation, loss)
        got = profile_batch(layer, x, targets, backend="hooks", units=index, aggregation=aggregation, loss=loss)
        scale = want.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        error = (got - want).abs() / scale
        sample, unit = divmod(int(error.argmax()), error.shape[1])
        if float(error.max()) > rtol:
            raise AssertionError(f"the reducer of {type(module).__qualname__} is wrong for {aggregation}: sample "
                                 f"{sample}, unit {unit} ({index.param_of(unit)}) gives "
                                 f"{float(got[sample, unit]):.6g} where the reference gives "
                                 f"{float(want[sample, unit]):.6g} (relative error {float(error.max()):.3g})")
        worst = max(worst, float(error.max()))
    return worst


class _Wrapped(nn.Module):
    """The layer under test as the only submodule, so that its parameters are named ``layer.<attr>``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _row_units(model: _Wrapped, attrs: frozenset[str]) -> UnitIndex:
    """One unit per row of each parameter of the layer that the reducer claims."""
    def rows(name: str, param: torch.Tensor) -> torch.Tensor | None:
        if name.rpartition(".")[2] not in attrs or param.dim() == 0:
            return None
        return torch.arange(param.shape[0]).reshape(-1, *[1] * (param.dim() - 1)).expand_as(param).clone()

    index = units_of(model, rows)
    # The same units as rows, the partition reducers serve fastest (and the one most reducers expect).
    return dataclasses.replace(index, groups=tuple(
        dataclasses.replace(g, partition="rows", assignment=None) for g in index.groups))
