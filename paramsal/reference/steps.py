"""The oracle of one-step fine-tuning: a deep copy of the model after one real ``torch.optim.SGD`` step."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from paramsal.engine.functional import LossFn, cross_entropy_per_sample
from paramsal.engine.units import UnitIndex, check_single_parameter

__all__ = ["stepped_copy"]


def stepped_copy(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor, index: UnitIndex | None,
                 unit_ids: Sequence[int] | None, lr: float, grad_scale: float = 1.0,
                 loss: LossFn | None = None) -> nn.Module:
    """A deep copy of ``model`` after one real ``torch.optim.SGD`` step on one sample.

    The slow, obviously correct way (one model copy per sample) that the
    batched evaluation of :class:`paramsal.FineTune` must equal; also the
    baseline of its speed comparison. The copy is in eval mode while the
    gradient is taken (BatchNorm on its running statistics, which do not move).

    Args:
        model: the network (not modified).
        inputs: ``[...]`` one input, without batch dim.
        target: its target (a class index for the default loss).
        index: the units of ``unit_ids`` (ignored when ``unit_ids`` is None).
        unit_ids: the units whose whole filter weights move; None = every parameter.
        lr: the learning rate (plain SGD: no momentum, no weight decay).
        grad_scale: multiplies the gradient of the moving weights first.
        loss: ``loss(outputs [1, ...], targets [1, ...]) -> [1]``, the sample's
            loss; default cross-entropy.

    Returns:
        The updated copy, in eval mode.
    """
    if index is not None:
        check_single_parameter(index, "stepped_copy")
    loss = loss or cross_entropy_per_sample
    tuned = copy.deepcopy(model).eval()
    params = dict(tuned.named_parameters())
    for p in params.values():
        p.grad = None
    targets = torch.as_tensor(target, device=inputs.device).reshape(1, *torch.as_tensor(target).shape)
    loss(tuned(inputs.unsqueeze(0)), targets).sum().backward()
    if unit_ids is None or index is None:
        moving = [p for p in params.values() if p.grad is not None]
    else:
        moving = []
        for group in index:
            rows = [int(u) - group.offset for u in unit_ids if group.offset <= int(u) < group.stop]
            gradient = params[group.param_name].grad
            if rows and gradient is not None:
                keep = torch.zeros_like(gradient)
                keep[rows] = 1
                gradient.mul_(keep)
                moving.append(params[group.param_name])
    for p in moving:
        p.grad.mul_(grad_scale)  # type: ignore[union-attr]  # every moving parameter has a gradient
    torch.optim.SGD(moving, lr=lr, momentum=0.0, weight_decay=0.0).step()
    return tuned
