"""The paper's reference semantics, written for clarity, not speed: the test oracle.

One sample at a time, ``torch.autograd.grad`` of that sample's loss, then one
unit at a time, the aggregation over exactly the elements of that unit (all of
them at once for a unit that spans parameters). Slow on purpose; use it to
check a backend or a new reducer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.engine.profile import eval_mode
from paramsal.engine.units import UnitGroup, UnitIndex


def reference_profiles(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                       aggregation: str = "mean_abs",
                       loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``[N, F]`` raw profiles computed one sample and one unit at a time.

    Args:
        model: the network; evaluated in eval mode (restored afterwards).
        inputs: ``[N, ...]``.
        targets: ``[N, ...]``.
        index: the units (see :func:`paramsal.units_of`).
        aggregation: "mean_abs" (``mean |g|``) or "abs_mean" (``|mean g|``).
        loss: per-sample loss ``(outputs, targets) -> [n]``; default cross-entropy.
    """
    loss = loss or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    parts = [list(g.parts or (g,)) for g in index]
    names = list(dict.fromkeys(part.param_name for group in parts for part in group))
    params = [model.get_parameter(name) for name in names]
    rows = []
    with eval_mode(model), torch.enable_grad():
        for n in range(len(inputs)):
            sample_loss = loss(model(inputs[n:n + 1]), targets[n:n + 1]).sum()
            grads = dict(zip(names, torch.autograd.grad(sample_loss, params, allow_unused=True)))
            row: list[torch.Tensor] = []
            for group in parts:
                full = [torch.zeros(part.shape, dtype=params[0].dtype) if grads[part.param_name] is None
                        else grads[part.param_name].detach().cpu() for part in group]
                masks = zip(*(_unit_masks(part) for part in group))  # unit u's mask in each part
                row.extend(_unit_value(torch.cat([g[mask] for g, mask in zip(full, unit)]), aggregation)
                           for unit in masks)
            rows.append(torch.stack(row))
    return torch.stack(rows)


def _unit_masks(group: UnitGroup):
    for unit in range(group.num_units):
        mask = torch.zeros(group.shape, dtype=torch.bool)
        if group.partition == "rows":
            mask[unit] = True
        elif group.partition == "columns":
            mask[:, unit] = True
        elif group.assignment is not None:
            mask = group.assignment == unit
        yield mask


def _unit_value(values: torch.Tensor, aggregation: str) -> torch.Tensor:
    return values.abs().mean() if aggregation == "mean_abs" else values.mean().abs()
