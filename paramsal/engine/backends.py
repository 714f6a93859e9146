"""The three interchangeable ways to compute a batch of raw saliency profiles.

All take the same arguments and return a :class:`BatchResult`; they differ only
in speed and memory. ``loop`` is the oracle (one sample at a time, as the
paper's code), ``vmap`` works for any functional model, ``hooks`` reduces each
layer's per-sample gradient to units during a single batched backward pass.

Under a reduced :class:`~paramsal.engine.functional.Precision` every backend
runs the forward pass and the loss under autocast (so the backward pass
computes in the same lowered dtypes), scales the losses for fp16, and forms
profiles, losses and outputs in the parameters' float32; the hooks backend's
reducers see float32 copies of what they captured, with autocast off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from paramsal.engine.functional import FLOAT32, LossFn, Precision, SampleLoss
from paramsal.engine.graph import parameter_edges
from paramsal.engine.hooks import HookSession
from paramsal.engine.plan import hook_plan
from paramsal.engine.units import UnitIndex
from paramsal.errors import InputError, unsupported_use, user_code
from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, reduce_grad


@dataclass
class BatchResult:
    """What one batch yields.

    Attributes:
        profiles: ``[N, F]`` raw profiles in the parameters' dtype (float32 under bf16/fp16 too).
        outputs: ``[N, ...]`` the model's outputs (logits), detached.
        losses: ``[N]`` each sample's own loss, detached.
        features: ``[N, D]`` the input of the features module, when asked for.
    """

    profiles: torch.Tensor
    outputs: torch.Tensor
    losses: torch.Tensor
    features: torch.Tensor | None = None


Backend = Callable[[nn.Module, torch.Tensor, torch.Tensor, UnitIndex, LossFn, Aggregation, "int | None",
                    Precision], BatchResult]


def loop_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                 loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None,
                 precision: Precision = FLOAT32) -> BatchResult:
    """One sample at a time with ``torch.autograd.grad``: the reference semantics."""
    params = [model.get_parameter(g.param_name) for g in index]
    profiles = params[0].new_zeros(len(inputs), len(index))
    outputs, losses = [], []
    with _params_require_grad(params):
        for n in range(len(inputs)):
            with precision.forward(inputs.device):
                out = model_outputs(model, inputs[n:n + 1], 1)
                loss = sample_losses(loss_fn, out, targets[n:n + 1])
            grads = torch.autograd.grad(precision.scaled(loss).sum(), params, allow_unused=True)
            for group, g in zip(index, grads):
                if g is not None:
                    profiles[n, group.offset:group.stop] = reduce_grad(g.unsqueeze(0), group, aggregation)[0]
            outputs.append(precision.restored(out.detach(), profiles.dtype))
            losses.append(precision.restored(loss.detach(), profiles.dtype))
    return BatchResult(precision.unscaled(profiles), torch.cat(outputs), torch.cat(losses))


def vmap_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                 loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None,
                 precision: Precision = FLOAT32) -> BatchResult:
    """``vmap(grad(...))`` over a functional copy of the model, reduced to units chunk by chunk.

    ``chunk_size`` bounds memory: each chunk holds its samples' full gradients
    of the unit-bearing parameters. None picks one that fits the vmap share
    of :func:`paramsal.kernels.chunks.memory_budget` (the activations under
    vmap scale alike).
    """
    real = {g.param_name: model.get_parameter(g.param_name) for g in index}
    sample_loss = SampleLoss(model, list(real), loss_fn, precision)
    per_sample = sample_loss.per_sample()
    like = next(iter(sample_loss.params.values()))
    chunk = chunk_size or auto_chunk(sum(p.numel() for p in real.values()), len(inputs), like, "vmap")
    profiles, outputs, losses = [], [], []
    with _params_require_grad(list(real.values())):
        for s in chunk_slices(len(inputs), chunk):
            with user_code(f"the model ({type(model).__name__}) under torch.func.vmap on inputs of shape "
                           f"{tuple(inputs[s].shape)}", hint="; backend='loop' needs no vmap support"), \
                    _vmap_limits(model):
                grads, (out, loss) = per_sample(inputs[s], targets[s])
            _check_functional(loss, real)
            loss = checked_losses(loss.reshape(-1), s.stop - s.start)
            profiles.append(torch.cat([reduce_grad(grads[g.param_name], g, aggregation) for g in index], 1))
            outputs.append(precision.restored(out.detach(), like.dtype))
            losses.append(precision.restored(loss.detach(), like.dtype))
    return BatchResult(precision.unscaled(torch.cat(profiles)), torch.cat(outputs), torch.cat(losses))


@contextmanager
def _vmap_limits(model: nn.Module) -> Iterator[None]:
    """A forward pass that branches on a tensor's value (``if mask.all():``) cannot run under vmap at all: that
    is a limit of torch.func, not bad input, so ``backend="auto"`` takes the loop instead."""
    try:
        yield
    except RuntimeError as exc:
        if "data-dependent control flow" not in str(exc):
            raise
        raise unsupported_use(
            f"the model ({type(model).__name__}) cannot run under torch.func.vmap: its forward pass branches on "
            "a tensor's value (.item(), if tensor:, ...): use backend='loop' (backend='auto' falls back to it)"
        ) from exc


def _check_functional(losses: torch.Tensor, real: dict[str, nn.Parameter]) -> None:
    """The vmapped losses must reach the real unit parameters through functional_call's copies only.

    A loss that uses a parameter itself (a weight penalty), or a module that
    keeps its own reference to another's weight, uses the real tensor, which
    torch.func does not differentiate: regular autograd records that use.
    """
    if losses.grad_fn is None:
        return
    edges = parameter_edges(losses.grad_fn, {id(p): p for p in real.values()})
    if edges:
        name = next(n for n, p in real.items() if id(p) == edges[0][0])
        raise unsupported_use(
            f"parameter {name!r} is used outside the model's parameters as torch.func.functional_call swaps "
            "them (by the loss, or through a reference kept elsewhere), so vmap would miss that use: use "
            "backend='loop' (backend='auto' falls back to it)")


def hooks_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                  loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None,
                  precision: Precision = FLOAT32) -> BatchResult:
    """One batched forward and backward; each layer's per-sample gradient is reduced as it appears.

    Backpropagating ``sum_n L_n`` gives each layer the output gradient of every
    sample's own loss (samples are independent in eval mode), from which a
    registered reducer forms that layer's per-unit saliency at once. Autograd
    is asked for the input gradient only, so it never computes the batched
    parameter gradients that nobody would use. Every use of a unit parameter
    is accounted for before the backward pass (:mod:`paramsal.engine.hooks`).

    Raises:
        UnsupportedUseError: a unit parameter is used where no reducer serves it.
    """
    plan = hook_plan(model, index)
    params = [model.get_parameter(g.param_name) for g in index]
    dtype = params[0].dtype if precision.dtype is not None else None
    with _params_require_grad(params), HookSession(plan, index, aggregation, chunk_size, dtype, len(inputs)) as session:
        leaf = inputs.detach().requires_grad_(True) if inputs.is_floating_point() else None
        with session.tracking(), precision.forward(inputs.device):
            out = model_outputs(model, inputs if leaf is None else leaf, len(inputs))
            losses = sample_losses(loss_fn, out, targets)
        session.check(losses)
        check_sample_dim(session, len(inputs))
        wrt = [leaf] if leaf is not None else session.output_edges
        if wrt:
            torch.autograd.grad(precision.scaled(losses).sum(), wrt, allow_unused=True)
        profiles = precision.unscaled(session.assemble(len(inputs), params[0]))
    return BatchResult(profiles, precision.restored(out.detach(), profiles.dtype),
                       precision.restored(losses.detach(), profiles.dtype))


def check_sample_dim(session: HookSession, batch: int, samples: str = "the batch's") -> None:
    """Every served call's input must have the batch's samples along its first dimension, which is where the
    reducers take them from.

    Raises:
        UnsupportedUseError: for an input of another first size (a sequence-first layout, windows folded into
            the batch, ...), naming the call.
    """
    for where, name, activations in session.served_inputs():
        if activations.dim() == 0 or activations.shape[0] != batch:
            raise unsupported_use(
                f"parameter {name!r} is used by {where} on an input of shape {tuple(activations.shape)}, whose "
                f"first dimension is not {samples} {batch} samples (a sequence-first layout, or windows folded "
                "into the batch), so the reducers cannot tell the samples apart")


def prove_sample_layout(model: nn.Module, inputs: torch.Tensor, index: UnitIndex) -> bool:
    """Proves on two probes of two samples that row 1 of every served call's input belongs to sample 1 alone.

    The shapes alone cannot tell a sequence-first tensor ``[T, N, C]`` with
    ``T == N`` from a batch-first one, and reducers that took the time steps
    for samples would give wrong profiles. So the forward pass is run on
    ``[x0, x1]`` and on ``[x0', x1]``, where ``x0'`` differs from ``x0`` in
    every element: in a batch-first input, row 1 is the same in both.

    Returns:
        True once proven; False when ``inputs`` holds a single sample (then
        any layout whose first dimension has size 1 is that sample's).

    Raises:
        UnsupportedUseError: when row 1 of some served input changed (or the probes took different paths).
    """
    if len(inputs) < 2:
        return False
    first, other = inputs[0], inputs[1]
    if inputs.is_floating_point():
        changed = first + 1
    else:  # token ids and the like: another id at every position, within the ids the batch uses
        top = inputs.max()
        changed = (first + 1) % (top + 1) if top > 0 else first + 1
    plan = hook_plan(model, index)
    params = [model.get_parameter(g.param_name) for g in index]
    seen = []
    for probe in (torch.stack([first, other]), torch.stack([changed, other])):
        with _params_require_grad(params), HookSession(plan, index, "mean_abs", None, batch=2) as session:
            with session.tracking():
                model_outputs(model, probe, 2, shown=inputs)
            check_sample_dim(session, 2, "a probe's")
            seen.append(session.served_inputs())
    if [(where, name) for where, name, _ in seen[0]] != [(where, name) for where, name, _ in seen[1]]:
        raise unsupported_use("the forward pass took other paths for two probes of two samples, so the hooks "
                              "backend cannot prove where the samples are")
    for (where, name, before), (_, _, after) in zip(*seen):
        before, after = before.double(), after.double()  # token ids too
        scale = float(before.abs().max()) if before.numel() else 0.0
        if not torch.allclose(before[1:], after[1:], rtol=1e-5, atol=1e-6 * scale):
            raise unsupported_use(
                f"parameter {name!r} is used by {where} on inputs whose rows are not samples: changing sample 0 "
                "changed row 1 (a sequence-first layout [T, N, ...], or a batch that mixes samples), so the "
                "reducers would mix samples")
    return True


#: How far a batched backend's row may sit from the loop's for the same sample, relative to the row's largest entry.
APART_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
#: ... under bf16/fp16, where both sides round the forward pass (measured: within 4e-3).
APART_TOLERANCE_REDUCED = 0.1


def check_samples_apart(result: BatchResult, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                        index: UnitIndex, loss_fn: LossFn, aggregation: Aggregation,
                        precision: Precision = FLOAT32) -> bool:
    """Checks a batched backend's first row against the loop on that sample alone (the reference semantics).

    A model whose forward pass keeps samples apart can still mix them in its
    backward pass (a custom autograd function, or a cache of a batch's
    values): then the gradient of the batch's summed losses is not the sum of
    the samples' own gradients, and every batched backend, hooks and vmap
    alike, is wrong. One sample's loop costs little next to a data set.

    Returns:
        True once checked; False when the batch has a single sample or row 0 is not finite (check a later batch).

    Raises:
        UnsupportedUseError: when the rows differ, naming how far.
    """
    row = result.profiles[0]
    if len(inputs) < 2 or not bool(torch.isfinite(row).all()):
        return False
    alone = loop_backend(model, inputs[:1], targets[:1], index, loss_fn, aggregation, None, precision).profiles[0]
    if not bool(torch.isfinite(alone).all()):
        return False
    scale = float(alone.abs().max())
    error = float((row - alone).abs().max()) / scale if scale > 0 else float((row - alone).abs().max())
    limit = APART_TOLERANCE_REDUCED if precision.dtype is not None else APART_TOLERANCE.get(row.dtype, 1e-3)
    if error > limit:
        raise unsupported_use(
            f"the batch gives sample 0 another profile than the sample alone (relative difference {error:.2g}): "
            f"{type(model).__name__}'s backward pass mixes the samples of a batch, so batched per-sample gradients "
            "are not the samples' own", "loop")
    return True


def model_outputs(model: nn.Module, inputs: torch.Tensor, batch: int | None = None,
                  shown: torch.Tensor | None = None) -> torch.Tensor:
    """``model(inputs)``; the model's failures (wrong shapes, ...) become one :class:`InputError`.

    ``batch``: the number of output rows to expect; ``shown``: the batch to
    name in messages when ``inputs`` is a probe taken from it.
    """
    shape = tuple((inputs if shown is None else shown).shape)
    with user_code(f"the model ({type(model).__name__}) on inputs of shape {shape}"):
        out = model(inputs)
    if batch is not None and (not isinstance(out, torch.Tensor) or out.dim() == 0 or len(out) != batch):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the model returned outputs {got} for a batch of {batch} inputs of shape "
                         f"{shape}: inputs must be a batch [N, ...] (one sample is x[None]) and the "
                         "model must return one row of outputs per sample")
    return out


def sample_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, checked to give one loss per sample."""
    with user_code(f"the loss on outputs of shape {tuple(outputs.shape)} and targets of shape "
                   f"{tuple(targets.shape)}"):
        losses = loss_fn(outputs, targets)
    return checked_losses(losses, len(outputs))


def checked_losses(losses: torch.Tensor, batch: int) -> torch.Tensor:
    """The loss callable must give one value per sample."""
    if losses.shape != (batch,):
        raise InputError(f"the loss must return one value per sample, shape ({batch},); got {tuple(losses.shape)}. "
                         "Pass a per-sample loss (e.g. reduction='none')")
    return losses


@contextmanager
def _params_require_grad(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Frozen parameters still have a per-sample gradient; enable it for the duration only."""
    frozen = [p for p in params if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


BACKEND_FUNCTIONS: dict[str, Backend] = {"loop": loop_backend, "vmap": vmap_backend, "hooks": hooks_backend}
