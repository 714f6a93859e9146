"""Per-sample gradients through ``torch.func``, with the user's loss: the one helper every torch.func user shares.

The vmap backend, one-step fine-tuning and input-space saliency all need
``∂L_n/∂θ`` for each sample n, with ``L_n`` the sample's own loss. They differ
in what they do with it (reduce it to units, step along it, differentiate a
function of it again), not in how it is formed, which is here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from paramsal.options import IGNORE_INDEX

#: ``loss(outputs, targets) -> [N]``: one loss per sample, each depending on that sample's outputs only.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

Params = dict[str, torch.Tensor]

#: The dtype autocast computes in at each reduced precision (:data:`paramsal.options.COMPUTE_PRECISIONS`).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Under fp16 each sample's loss is multiplied by this before the backward
#: pass and the profiles divided by it after (mean_abs and abs_mean are both
#: linear in it; a power of two, so both steps are exact). fp16 keeps full
#: precision in [6.1e-5, 65504]. Measured on the demo model's first 1024 test
#: samples. Underflow: activation gradients span 2**0 down to 2**-52 within a
#: sample; unscaled, fp16 flushes about 100 units to exactly zero that float32
#: does not (96 with hooks, 104 with vmap), 2**4 still 7, 2**8 none.
#: Overflow: cross-entropy's gradient with respect to a logit is at most 1
#: (about -1 for a badly misclassified sample, the samples of interest), so
#: 2**16 overflows at the logits (26 samples with hooks); loop and vmap also
#: round each weight gradient, a sum over output positions, to fp16 (up to
#: 26 here): vmap overflows from 2**12 (16 samples). 2**8 is the smallest
#: clean scale, 16x below the first that overflows, for models with larger
#: gradients than the demo's.
FP16_LOSS_SCALE = 2.0**8


@dataclass(frozen=True)
class Precision:
    """What the forward pass computes in: float32 (as the model is), or bf16/fp16 under ``torch.autocast``.

    Under autocast only the model's forward and the loss (and through them the
    backward) are lowered; the losses, outputs and per-unit reductions the
    engine returns are in the parameters' dtype (float32).

    Attributes:
        name: "float32", "bf16" or "fp16".
    """

    name: str = "float32"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for float32 (no autocast)."""
        return AUTOCAST_DTYPES.get(self.name)

    @property
    def loss_scale(self) -> float:
        return FP16_LOSS_SCALE if self.name == "fp16" else 1.0

    def forward(self, device: torch.device) -> AbstractContextManager:
        """Around a forward pass and its loss. The autocast keeps no cache of cast weights: each use of a
        parameter casts it again, so that every use has its own autograd node (the hooks backend counts uses)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=False)

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        """What the backward pass differentiates: the per-sample losses times :attr:`loss_scale`."""
        return losses if self.loss_scale == 1 else losses.float() * self.loss_scale

    def unscaled(self, profiles: torch.Tensor) -> torch.Tensor:
        return profiles if self.loss_scale == 1 else profiles / self.loss_scale

    def restored(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A floating result of the lowered forward (outputs, losses, features) back in ``dtype``."""
        return t.to(dtype) if self.dtype is not None and t.is_floating_point() else t


FLOAT32 = Precision()


def cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of each sample, ``[N, C], [N] -> [N]``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def targeted_loss(loss: LossFn | None, target: str | int) -> LossFn | None:
    """The loss of a target choice (:data:`paramsal.options.TARGETS`, or a class index).

    "label": ``loss`` as given (None: cross-entropy with the labels, the
    paper); "predicted": the loss at the class the model predicts for that
    sample (its own argmax, no label needed); a class index ``c``: the loss at
    class ``c`` for every sample ("why not c?").
    """
    if target == "label":
        return loss
    base = loss or cross_entropy_per_sample

    def of_predicted(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return base(outputs, _labelled_alike(outputs.detach().argmax(-1), targets))

    def of_class(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chosen = torch.full(outputs.shape[:-1], int(target), dtype=torch.long, device=outputs.device)
        return base(outputs, _labelled_alike(chosen, targets))

    return of_predicted if target == "predicted" else of_class


def _labelled_alike(chosen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Chosen labels at the positions the given labels label: a masked language model's other positions
    (:data:`IGNORE_INDEX`) stay without one."""
    if chosen.shape != targets.shape:
        return chosen
    return torch.where(targets == IGNORE_INDEX, targets, chosen)


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
        precision: the forward under autocast (bf16, fp16), the loss scaled
            for fp16 (the gradients are then :attr:`Precision.loss_scale` times
            the loss's; the auxiliary losses are not scaled).

    Attributes:
        params: ``{name: tensor}`` the differentiated parameters' current values (detached).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss: LossFn | None = None,
                 precision: Precision = FLOAT32):
        values = {name: p.detach() for name, p in model.named_parameters()}
        unknown = [name for name in names if name not in values]
        if unknown:
            raise KeyError(f"{type(model).__name__} has no parameters {unknown}")
        self.model = model
        self.loss = loss or cross_entropy_per_sample
        self.precision = precision
        self.params: Params = {name: values[name] for name in names}
        self._constants: Params = {name: p for name, p in values.items() if name not in self.params}
        self._constants.update(dict(model.named_buffers()))

    def __call__(self, params: Params, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        norms = _NormsInFloat32() if self.precision.dtype is not None else nullcontext()
        with self.precision.forward(x.device), norms:
            outputs = functional_call(self.model, (params, self._constants), (x.unsqueeze(0),))
            losses = self.loss(outputs, y.unsqueeze(0))
        return self.precision.scaled(losses).sum(), (outputs.squeeze(0), losses)

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


#: Normalizations that fail under ``vmap(grad(...))`` with a bf16/fp16 input and float32 parameters or
#: statistics ("expected scalar type BFloat16 but found Float", torch 2.14; pytorch PR #184968).
_MIXED_NORMS = frozenset({F.batch_norm, F.instance_norm, F.layer_norm, torch.batch_norm, torch.instance_norm,
                          torch.layer_norm})


class _NormsInFloat32(TorchFunctionMode):
    """Under autocast, runs those normalizations on a float32 copy of their input and rounds the output back.

    That is what their mixed-dtype kernels do outside vmap on the CPU (compute
    in float32, return the input's dtype), so the vmap backend computes what
    the loop backend does.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if func in _MIXED_NORMS and isinstance(x, torch.Tensor) and x.dtype in AUTOCAST_DTYPES.values():
            return func(x.float(), *args[1:], **kwargs).to(x.dtype)
        return func(*args, **kwargs)
