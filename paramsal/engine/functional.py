"""Per-sample gradients through ``torch.func``, with the user's loss: the one helper every torch.func user shares.

The vmap backend, one-step fine-tuning and input-space saliency all need
``∂L_n/∂θ`` for each sample n, with ``L_n`` the sample's own loss. They differ
in what they do with it (reduce it to units, step along it, differentiate a
function of it again), not in how it is formed, which is here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

#: ``loss(outputs, targets) -> [N]``: one loss per sample, each depending on that sample's outputs only.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

Params = dict[str, torch.Tensor]


def cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of each sample, ``[N, C], [N] -> [N]``."""
    return F.cross_entropy(outputs, targets, reduction="none")


class SampleLoss:
    """One sample's loss as a function of some of the model's parameters, the form ``torch.func`` differentiates.

    ``loss(params, x, y)`` returns ``(L, (outputs, losses))``: the scalar loss
    of the single sample ``x`` (no batch dim) with target ``y``, and, as
    auxiliary outputs, the model's output row and the ``[1]`` loss. Every
    other parameter and every buffer enters as a constant.

    Args:
        model: the network, in eval mode (so that samples do not interact).
        names: the parameters to differentiate (names in ``model.named_parameters()``).
        loss: per-sample loss; default cross-entropy.

    Attributes:
        params: ``{name: tensor}`` the differentiated parameters' current values (detached).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss: LossFn | None = None):
        values = {name: p.detach() for name, p in model.named_parameters()}
        unknown = [name for name in names if name not in values]
        if unknown:
            raise KeyError(f"{type(model).__name__} has no parameters {unknown}")
        self.model = model
        self.loss = loss or cross_entropy_per_sample
        self.params: Params = {name: values[name] for name in names}
        self._constants: Params = {name: p for name, p in values.items() if name not in self.params}
        self._constants.update(dict(model.named_buffers()))

    def __call__(self, params: Params, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        outputs = functional_call(self.model, (params, self._constants), (x.unsqueeze(0),))
        losses = self.loss(outputs, y.unsqueeze(0))
        return losses.sum(), (outputs.squeeze(0), losses)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> Params:
        """One sample's gradient ``{name: [*shape]}``, itself differentiable (e.g. with respect to ``x``)."""
        return grad(lambda params: self(params, x, y)[0])(self.params)

    def per_sample(self, chunk_size: int | None = None):
        """``f(inputs [n, ...], targets [n]) -> (grads {name: [n, *shape]}, (outputs [n, ...], losses [n, 1]))``."""
        batched = vmap(grad(self, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size)
        return lambda inputs, targets: batched(self.params, inputs, targets)


def per_sample_gradients(model: nn.Module, names: Sequence[str], inputs: torch.Tensor, targets: torch.Tensor,
                         loss: LossFn | None = None, chunk_size: int | None = None) -> Params:
    """The gradient of each sample's own loss with respect to some parameters.

    Args:
        model: the network, in eval mode (BatchNorm on running statistics).
        names: parameters to differentiate.
        inputs: ``[n, ...]`` one input per sample.
        targets: ``[n, ...]`` one target per sample.
        loss: per-sample loss; default cross-entropy.
        chunk_size: samples per vmap chunk (bounds memory).

    Returns:
        ``{name: [n, *param.shape]}``, row i = ``∂L(x_i, y_i)/∂θ``.
    """
    grads, _ = SampleLoss(model, names, loss).per_sample(chunk_size)(inputs, targets)
    return grads
