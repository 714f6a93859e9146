"""The oracle of one-step fine-tuning: a deep copy of the model after one real ``torch.optim.SGD`` step."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from paramsal.engine.functional import LossFn, cross_entropy_per_sample
from paramsal.engine.units import UnitIndex, unit_owners

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
        unit_ids: the units whose weights move (a filter's whole weights; every weight of a neuron or head, in each
            of its parameters); None = every parameter.
        lr: the learning rate (plain SGD: no momentum, no weight decay).
        grad_scale: multiplies the gradient of the moving weights first.
        loss: ``loss(outputs [1, ...], targets [1, ...]) -> [1]``, the sample's
            loss; default cross-entropy.

    Returns:
        The updated copy, in eval mode.
    """
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
            local = torch.tensor([int(u) - group.offset for u in unit_ids if group.offset <= int(u) < group.stop])
            for part in group.parts or (group,):
                gradient = params[part.param_name].grad
                if len(local) and gradient is not None:
                    gradient.mul_(torch.isin(unit_owners(part), local).to(gradient.device, gradient.dtype))
                    moving.append(params[part.param_name])
    for p in moving:
        p.grad.mul_(grad_scale)  # type: ignore[union-attr]  # every moving parameter has a gradient
    torch.optim.SGD(moving, lr=lr, momentum=0.0, weight_decay=0.0).step()
    return tuned
