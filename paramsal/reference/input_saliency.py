"""Input-space saliency one sample at a time with ``autograd.grad(create_graph=True)``: the oracle of both backends.

For each sample: its own loss, its parameter gradient with a graph
(``create_graph=True``), the raw profile one unit at a time (the
aggregation over exactly that unit's elements, as
:func:`paramsal.reference.reference_profiles`), ``ŝ = (s - μ) / σ`` written
out, the cosine distance to the fixed target ``s'_F``, and the gradient of
that distance with respect to the sample's input (the double backward).
Slow on purpose; :class:`paramsal.analyses.InputSaliency` must give the same
numbers with either backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.engine.functional import LossFn, cross_entropy_per_sample
from paramsal.engine.profile import eval_mode
from paramsal.engine.units import UnitIndex, UnitsSpec, check_single_parameter, units_of
from paramsal.ranking.stats import SaliencyStats
from paramsal.reference.profiles import _unit_masks, _unit_value


def attribution_loop(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target: torch.Tensor, *,
                     stats: SaliencyStats, units: UnitsSpec | UnitIndex = "filters", aggregation: str = "mean_abs",
                     loss: LossFn | None = None) -> torch.Tensor:
    """``M_F = |∇_x D_C(ŝ(x, y), s'_F)|`` of each sample, computed one sample and one unit at a time.

    Args:
        model: the network; evaluated in eval mode (every flag restored afterwards).
        inputs: ``[N, ...]`` in the model's dtype and device.
        targets: ``[N, ...]`` one target per sample (class indices for cross-entropy).
        target: ``[N, F]`` the boosted profiles ``s'_F``, held constant.
        stats: the statistics that standardize the raw profiles (``ŝ = (s - μ) / σ``).
        units: the partition of the parameters (as :func:`paramsal.units_of`).
        aggregation: "mean_abs" (paper) or "abs_mean".
        loss: per-sample loss ``(outputs [1, ...], targets [1, ...]) -> [1]``; default cross-entropy.
            The gradient is that of the sample's *own* loss.

    Returns:
        ``[N, ...]`` like ``inputs``, detached, >= 0.
    """
    index = units if isinstance(units, UnitIndex) else units_of(model, units)
    check_single_parameter(index, "attribution_loop")
    loss = loss or cross_entropy_per_sample
    params = [model.get_parameter(group.param_name) for group in index]
    masks = [[mask.to(p.device) for mask in _unit_masks(group)] for group, p in zip(index, params)]
    rows = []
    with eval_mode(model), torch.enable_grad():
        for n in range(len(inputs)):
            x = inputs[n:n + 1].detach().requires_grad_(True)
            sample_loss = loss(model(x), targets[n:n + 1]).sum()
            grads = torch.autograd.grad(sample_loss, params, create_graph=True)
            raw = torch.stack([_unit_value(g[mask], aggregation) for g, group in zip(grads, masks) for mask in group])
            mean = torch.as_tensor(stats.mean, dtype=raw.dtype, device=raw.device)
            std = torch.as_tensor(stats.std, dtype=raw.dtype, device=raw.device)
            distance = 1.0 - F.cosine_similarity((raw - mean) / std, target[n].to(raw), dim=0)
            rows.append(torch.autograd.grad(distance, x)[0][0].abs())
    return torch.stack(rows).detach()
