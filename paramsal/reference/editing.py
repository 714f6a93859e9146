"""The oracle of pruning: a deep copy of the model with some units really zeroed in its parameters."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import numpy as np
import torch
from torch import nn

from paramsal.analyses.unit_editing import UnitEditor
from paramsal.engine.units import UnitIndex, unit_owners
from paramsal.errors import InputError

__all__ = ["pruned_copy", "zeroed_copy"]


def pruned_copy(editor: UnitEditor, unit_ids: Sequence[int] | np.ndarray) -> nn.Module:
    """A deep copy of the editor's model with ``unit_ids`` really turned off, in its parameters.

    What :meth:`UnitEditor.switched_off` does for one sample, written into
    weights: for unit c of a layer, the layer's ``weight[c]`` and ``bias[c]``
    and, of each BatchNorm following it, ``weight[c]`` and ``bias[c]`` are set
    to 0. The slow, obviously correct way (one copy per sample), for checks
    and for users who want the pruned model itself.

    Args:
        editor: the editor of the model (:meth:`UnitEditor.locate`), which knows the following BatchNorms.
        unit_ids: the units to turn off (ids of ``editor.index``).

    Raises:
        InputError: a following BatchNorm without affine parameters (its
            output channel cannot be zeroed through parameters), or a call
            inside a ``switched_off``/``perturbed`` block.
    """
    if editor.editing:
        # A deep copy would take the block's hooks along and apply this batch's edits to it.
        raise InputError("pruned_copy inside a switched_off/perturbed block would copy its hooks; call it outside")
    copy = deepcopy(editor.model)
    ids = np.asarray(unit_ids, dtype=np.int64).reshape(-1)
    with torch.no_grad():
        for site in editor.sites:
            channels = torch.as_tensor(ids[(ids >= site.group.offset) & (ids < site.group.stop)] - site.group.offset)
            if not len(channels):
                continue
            for name in (site.module,) + site.followers:
                module = copy.get_submodule(name)
                if getattr(module, "weight", None) is None:
                    raise InputError(f"{name} has no affine parameters to zero; use UnitEditor.switched_off")
                for attr in ("weight", "bias"):
                    parameter = getattr(module, attr, None)
                    if parameter is not None:
                        parameter[channels] = 0
    return copy


def zeroed_copy(model: nn.Module, index: UnitIndex, unit_ids: Sequence[int] | np.ndarray) -> nn.Module:
    """A deep copy of ``model`` with every weight of the units ``unit_ids`` of ``index`` set to 0.

    The definition of turning a unit off, for units of any partition, of one
    parameter or spanning several (a neuron's rows of ``gate_proj`` and
    ``up_proj`` and its column of ``down_proj``): the oracle of
    :class:`~paramsal.analyses.compound_editing.CompoundEditor`.
    """
    copy = deepcopy(model)
    ids = np.asarray(unit_ids, dtype=np.int64).reshape(-1)
    with torch.no_grad():
        for group in index:
            local = ids[(ids >= group.offset) & (ids < group.stop)] - group.offset
            for part in (group.parts or (group,)) if len(local) else ():
                copy.get_parameter(part.param_name)[torch.isin(unit_owners(part), torch.as_tensor(local))] = 0
    return copy
