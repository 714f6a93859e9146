"""The pieces of input-space saliency: the boosted target profile, the distance the map differentiates, how
concentrated a map is, and the one-sample loop that differentiates it without ``torch.func``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paramsal.engine.functional import LossFn, cross_entropy_per_sample
from paramsal.engine.units import UnitIndex
from paramsal.kernels.reduce import Aggregation, reduce_grad
from paramsal.ranking.stats import SaliencyStats

#: The summary's concentration measure: the share of a map's mass in its top TOP_FRACTION of pixels.
TOP_FRACTION = 0.1


def boosted_profile(z: torch.Tensor, unit_ids: torch.Tensor | np.ndarray, boost: float) -> torch.Tensor:
    """``s'_F``: a detached copy of ``z [N, F]`` with the units ``unit_ids [N, k]`` multiplied by ``boost``."""
    target = z.detach().clone()
    rows = torch.arange(len(z), device=z.device)[:, None]
    target[rows, torch.as_tensor(unit_ids, dtype=torch.long).to(z.device)] *= boost
    return target


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dim."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def top_share(scores: torch.Tensor, fraction: float = TOP_FRACTION) -> np.ndarray:
    """``[N, H, W] -> [N]``: the share of each map's total in its ``fraction`` highest pixels (NaN for a zero map).

    A uniform map gives ``fraction``; a map whose mass sits in fewer pixels, more.
    """
    flat = scores.detach().flatten(1).double()
    count = max(1, round(fraction * flat.shape[1]))
    total = flat.sum(1)
    top = torch.topk(flat, count, dim=1).values.sum(1)
    return torch.where(total > 0, top / total.clamp_min(1e-300), torch.nan).cpu().numpy()


def attribute_loop(model: nn.Module, index: UnitIndex, stats: SaliencyStats, aggregation: Aggregation,
                    loss: LossFn | None, inputs: torch.Tensor, targets: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """The "loop" backend: one sample at a time with ``autograd.grad(create_graph=True)``."""
    loss = loss or cross_entropy_per_sample
    params = [model.get_parameter(name) for name in index.param_names]
    rows = []
    with torch.enable_grad():
        for n in range(len(inputs)):
            x = inputs[n:n + 1].detach().requires_grad_(True)
            grads = torch.autograd.grad(loss(model(x), targets[n:n + 1]).sum(), params, create_graph=True)
            raw = torch.cat([reduce_grad(g[None], group, aggregation)[0] for g, group in zip(grads, index)])
            distance = cosine_distance(stats.standardize(raw), target[n])
            rows.append(torch.autograd.grad(distance, x)[0][0])
    return torch.stack(rows).abs().detach()
