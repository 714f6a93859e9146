"""The one registry of per-layer reducers, keyed by module type.

A reducer turns a layer's saved input and its output gradient into per-sample,
per-unit saliency ``[B, units]`` for each of the layer's parameters that carry
units; it never returns the full per-sample gradient. Lookup walks the
module's MRO, so subclasses are found, but only while they keep the
registered class's ``forward``: a subclass that computes something else with
the same weights (weight standardization, say) would make the rule wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from paramsal.errors import InputError
from paramsal.kernels.conv import reduce_conv
from paramsal.kernels.linear import reduce_linear
from paramsal.kernels.reduce import Aggregation

if TYPE_CHECKING:
    from paramsal.engine.units import UnitGroup

#: ``reducer(layer, activations, backprops, groups, aggregation, chunk_size) -> [[B, U_g], ...]``
Reducer = Callable[[nn.Module, torch.Tensor, torch.Tensor, Sequence["UnitGroup"], Aggregation, "int | None"],
                   list[torch.Tensor]]


@dataclass(frozen=True)
class ReducerEntry:
    """A registered reducer and the parameter attributes it handles."""

    reducer: Reducer
    params: frozenset[str]


_REGISTRY: dict[type[nn.Module], ReducerEntry] = {
    nn.Conv1d: ReducerEntry(reduce_conv, frozenset({"weight", "bias"})),
    nn.Conv2d: ReducerEntry(reduce_conv, frozenset({"weight", "bias"})),
    nn.Conv3d: ReducerEntry(reduce_conv, frozenset({"weight", "bias"})),
    nn.Linear: ReducerEntry(reduce_linear, frozenset({"weight", "bias"})),
}


def register_reducer(module_type: type[nn.Module], reducer: Reducer, *,
                     params: Sequence[str] = ("weight", "bias"), override: bool = False) -> None:
    """Registers the per-sample reducer of a module type.

    Args:
        module_type: the class; its subclasses match too while they keep its ``forward``.
        reducer: ``reducer(layer, activations, backprops, groups, aggregation,
            chunk_size)`` returning one ``[B, group.num_units]`` tensor per group.
            ``activations`` is the layer's first positional input, ``backprops``
            the gradient w.r.t. its output, both ``[B, ...]``.
        params: the parameter attributes (``"weight"``, ...) the reducer handles.
        override: replace an existing registration instead of raising.
    """
    if module_type in _REGISTRY and not override:
        raise InputError(f"a reducer for {module_type.__qualname__} is already registered; "
                         "pass override=True to replace it")
    _REGISTRY[module_type] = ReducerEntry(reducer, frozenset(params))


def unregister_reducer(module_type: type[nn.Module]) -> None:
    """Removes the reducer registered for exactly ``module_type``."""
    _REGISTRY.pop(module_type, None)


def find_reducer(module: nn.Module) -> ReducerEntry | None:
    """The reducer for ``module``: its type's, else its nearest registered base's with the same forward."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None:
            return entry if type(module).forward is cls.forward else None
    return None
