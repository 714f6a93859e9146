"""Turning off, for chosen samples of a batch, units that span several Linear layers: an MLP's neurons and an
attention's heads (the ``"neurons"`` and ``"heads"`` units of a decoder LLM). The counterpart of
:class:`~paramsal.analyses.unit_editing.UnitEditor`, whose units are one layer's output channels.

Turning a unit off means zeroing every weight it is made of, and the editor
gets the same outputs without touching a weight, per sample, through hooks:

* a unit with a column of a Linear layer (a neuron's column of ``down_proj``,
  a query head's columns of ``o_proj``): that layer's input is multiplied by a
  per-sample mask over its columns (a forward pre-hook). Whatever else the
  unit holds (the neuron's rows of ``gate_proj`` and ``up_proj``, the head's
  rows of ``q_proj``) only feeds those columns, so zeroing the columns alone
  already removes the unit, and zeroing the rest as well changes nothing more;
* a unit of rows only (a key/value head's rows of ``k_proj`` and ``v_proj``):
  those layers' outputs are masked (forward hooks), which equals zeroing
  the rows and their bias entries. With its values zero, every query head
  that reads the key/value head outputs zero, whatever its attention weights.

The hooks run on every call of the layers inside the block, so greedy decoding
with a KV cache (which calls the model again per new token) sees the same units
off. The tests check the editor against a deep copy whose weights are zeroed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from paramsal.engine.units import UnitGroup, UnitIndex
from paramsal.errors import InputError

__all__ = ["CompoundEditor"]


@dataclass(frozen=True)
class _Site:
    """Where one group's units are switched off: a Linear layer's input columns or output rows.

    Attributes:
        layer: the Linear layer.
        side: "input" (a pre-hook masks the columns) or "output" (a hook masks the rows).
        units: ``[width]`` the group's unit (0-based) of each column or row, -1 where none.
        group: the group.
    """

    layer: nn.Linear
    side: str
    units: torch.Tensor
    group: UnitGroup


class CompoundEditor:
    """Per-sample switch-off of neurons and heads, configured once for a model and its units.

    ``with editor.switched_off(off): model(x)`` runs ``x`` with sample n's
    units ``off[n]`` off; the hooks exist only inside the block and are
    removed even when the forward pass raises.

    Args:
        model: the network.
        index: its units; every group must be made of Linear layers' weights
            (``units_of(model, "neurons")``, ``units_of(model, "heads")``).
    """

    def __init__(self, model: nn.Module, index: UnitIndex):
        self.model = model
        self.index = index
        uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
        self._sites = [site for group in index for site in _sites(model, group, uses)]

    @contextmanager
    def switched_off(self, off: torch.Tensor) -> Iterator[nn.Module]:
        """Turns sample n's units ``off[n]`` off for the forward passes inside the block.

        Args:
            off: ``[N, F]`` bool, True = unit off for that sample; N is the batch size of the passes inside.

        Yields:
            The model (unchanged: the hooks do the editing).
        """
        off = torch.as_tensor(off, dtype=torch.bool)
        if off.dim() != 2 or off.shape[1] != len(self.index):
            raise InputError(f"off must be [N, {len(self.index)}] (one column per unit), got {tuple(off.shape)}")
        handles = []
        try:
            for site in self._sites:
                group_off = off[:, site.group.offset:site.group.stop]
                if not bool(group_off.any()):
                    continue
                # column 0 stands for "no unit": always kept
                kept = torch.cat([torch.ones(len(off), 1, dtype=torch.bool), ~group_off], 1)[:, site.units + 1]
                if site.side == "input":
                    handles.append(site.layer.register_forward_pre_hook(_masking_input(kept)))
                else:
                    handles.append(site.layer.register_forward_hook(_masking_output(kept)))
            yield self.model
        finally:
            for handle in handles:
                handle.remove()


def _masked(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``x [N, ..., width]`` times sample n's mask ``kept[n]`` over its last dim."""
    if x.shape[0] != kept.shape[0]:
        raise InputError(f"the mask has {kept.shape[0]} samples but the batch has {x.shape[0]}")
    shape = (kept.shape[0],) + (1,) * (x.dim() - 2) + (kept.shape[1],)
    return x * kept.reshape(shape).to(x.device, x.dtype)


def _masking_input(kept: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (_masked(args[0], kept),) + args[1:]
    return hook


def _masking_output(kept: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _masked(output, kept)
    return hook


def _sites(model: nn.Module, group: UnitGroup, uses: Counter) -> list[_Site]:
    """The one input site of a group with columns, else the output sites of its rows (see the module docstring);
    ``uses`` counts the modules holding each parameter (by ``id``)."""
    parts = group.parts or (group,)
    modules = [model.get_submodule(part.module_name) for part in parts]
    layers = [m for m, part in zip(modules, parts) if isinstance(m, nn.Linear) and part.attr == "weight"]
    if len(layers) != len(parts):
        raise InputError(f"the units of {group.param_name!r} are not made of Linear layers' weights; "
                         "CompoundEditor switches off neurons and heads (units 'neurons', 'heads')")
    shared = [part.param_name for layer, part in zip(layers, parts) if uses[id(layer.weight)] > 1]
    if shared:
        # a hook at one layer would leave the weight's other uses as they are, where zeroing it changes them all
        raise InputError(f"{shared[0]} is shared with another module, so switching its units off at one layer "
                         "would not equal zeroing them; use paramsal.reference.zeroed_copy for this model")
    axes = [_unit_axis(part) for part in parts]
    columns = [n for n, (axis, _) in enumerate(axes) if axis == 1]
    if len(columns) > 1:
        raise InputError(f"the units of {group.param_name!r} have columns in {len(columns)} layers; "
                         "CompoundEditor switches off a unit at one layer's input")
    chosen = columns or range(len(parts))
    return [_Site(layers[n], "input" if axes[n][0] == 1 else "output", axes[n][1], group) for n in chosen]


def _unit_axis(part: UnitGroup) -> tuple[int, torch.Tensor]:
    """``(axis, units)``: whether a part's units are rows (0) or columns (1) of its weight, and the unit of each."""
    rows, columns = part.shape[0], part.shape[1] if len(part.shape) == 2 else 0
    if part.partition == "rows":
        return 0, torch.arange(rows)
    if part.partition == "columns":
        return 1, torch.arange(columns)
    if part.partition == "custom" and part.assignment is not None and len(part.shape) == 2:
        assignment = part.assignment
        if bool((assignment == assignment[:, :1]).all()):
            return 0, assignment[:, 0].clone()
        if bool((assignment == assignment[:1, :]).all()):
            return 1, assignment[0, :].clone()
    raise InputError(f"the units of {part.param_name!r} are neither whole rows nor whole columns; "
                     "CompoundEditor switches off neurons and heads (units 'neurons', 'heads')")
