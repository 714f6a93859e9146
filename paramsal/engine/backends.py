"""The three interchangeable ways to compute a batch of raw saliency profiles.

All take the same arguments and return a :class:`BatchResult`; they differ only
in speed and memory. ``loop`` is the oracle (one sample at a time, as the
paper's code), ``vmap`` works for any functional model, ``hooks`` reduces each
layer's per-sample gradient to units during a single batched backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from paramsal.engine.units import UnitGroup, UnitIndex
from paramsal.errors import InputError, UnsupportedModuleError
from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, reduce_grad
from paramsal.kernels.registry import ReducerEntry, find_reducer

#: ``loss(outputs, targets) -> [N]``: one loss per sample, each depending on
#: that sample's outputs only.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BatchResult:
    """What one batch yields.

    Attributes:
        profiles: ``[N, F]`` raw profiles in the parameters' dtype.
        outputs: ``[N, ...]`` the model's outputs (logits), detached.
        losses: ``[N]`` each sample's own loss, detached.
        features: ``[N, D]`` the input of the features module, when asked for.
    """

    profiles: torch.Tensor
    outputs: torch.Tensor
    losses: torch.Tensor
    features: torch.Tensor | None = None


Backend = Callable[[nn.Module, torch.Tensor, torch.Tensor, UnitIndex, LossFn, Aggregation, "int | None"],
                   BatchResult]


def loop_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                 loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None) -> BatchResult:
    """One sample at a time with ``torch.autograd.grad``: the reference semantics."""
    params = [model.get_parameter(g.param_name) for g in index]
    profiles = params[0].new_zeros(len(inputs), len(index))
    outputs, losses = [], []
    with _params_require_grad(params):
        for n in range(len(inputs)):
            out = model(inputs[n:n + 1])
            loss = checked_losses(loss_fn(out, targets[n:n + 1]), 1)
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            for group, g in zip(index, grads):
                if g is not None:
                    profiles[n, group.offset:group.stop] = reduce_grad(g.unsqueeze(0), group, aggregation)[0]
            outputs.append(out.detach())
            losses.append(loss.detach())
    return BatchResult(profiles, torch.cat(outputs), torch.cat(losses))


def vmap_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                 loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None) -> BatchResult:
    """``vmap(grad(...))`` over a functional copy of the model, reduced to units chunk by chunk.

    ``chunk_size`` bounds memory: each chunk holds its samples' full gradients
    of the unit-bearing parameters. None picks one that fits the vmap share
    of :func:`paramsal.kernels.chunks.memory_budget` (the activations under
    vmap scale alike).
    """
    unit_params = {g.param_name: model.get_parameter(g.param_name).detach() for g in index}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in unit_params}
    frozen.update(model.named_buffers())

    def sample_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        out = functional_call(model, (params, frozen), (x.unsqueeze(0),))
        loss = loss_fn(out, y.unsqueeze(0))
        return loss.sum(), (out.squeeze(0), loss)

    per_sample = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))
    like = next(iter(unit_params.values()))
    chunk = chunk_size or auto_chunk(sum(p.numel() for p in unit_params.values()), len(inputs), like, "vmap")
    profiles, outputs, losses = [], [], []
    for s in chunk_slices(len(inputs), chunk):
        grads, (out, loss) = per_sample(unit_params, inputs[s], targets[s])
        loss = checked_losses(loss.reshape(-1), s.stop - s.start)
        profiles.append(torch.cat([reduce_grad(grads[g.param_name], g, aggregation) for g in index], 1))
        outputs.append(out)
        losses.append(loss)
    return BatchResult(torch.cat(profiles), torch.cat(outputs), torch.cat(losses))


def hooks_backend(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, index: UnitIndex,
                  loss_fn: LossFn, aggregation: Aggregation, chunk_size: int | None = None) -> BatchResult:
    """One batched forward and backward; each layer's per-sample gradient is reduced as it appears.

    Backpropagating ``sum_n L_n`` gives each layer the output gradient of every
    sample's own loss (samples are independent in eval mode), from which a
    registered reducer forms that layer's per-unit saliency at once. Autograd
    is asked for the input gradient only, so it never computes the batched
    parameter gradients that nobody would use.
    """
    plan = hook_plan(model, index)
    params = [model.get_parameter(g.param_name) for g in index]
    with _params_require_grad(params), HookSession(plan, aggregation, chunk_size) as session:
        leaf = inputs.detach().requires_grad_(True) if inputs.is_floating_point() else None
        out = model(inputs if leaf is None else leaf)
        losses = checked_losses(loss_fn(out, targets), len(inputs))
        wrt = [leaf] if leaf is not None else session.output_edges
        if wrt:
            torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
        profiles = session.assemble(len(inputs), len(index), params[0])
    return BatchResult(profiles, out.detach(), losses.detach())


@dataclass(frozen=True)
class _Layer:
    module: nn.Module
    entry: ReducerEntry
    groups: tuple[UnitGroup, ...]


def hook_plan(model: nn.Module, index: UnitIndex) -> dict[str, _Layer]:
    """Which module's reducer serves which unit groups; raises for modules without one."""
    by_module: dict[str, list[UnitGroup]] = {}
    for group in index:
        by_module.setdefault(group.module_name, []).append(group)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__qualname__}) normalizes with batch statistics even in eval "
                "mode (track_running_stats=False), so a sample's output depends on the rest of its batch; "
                "use backend='vmap' or 'loop', which see one sample at a time")
    plan = {}
    for name, groups in by_module.items():
        module = model.get_submodule(name)
        entry = find_reducer(module)
        missing = [g.attr for g in groups if entry is None or g.attr not in entry.params]
        if missing:
            raise UnsupportedModuleError(
                f"module {name or '<root>'!r} ({type(module).__qualname__}) has no per-sample reducer for "
                f"its parameter(s) {missing}; register one with paramsal.kernels.register_reducer, "
                "or use backend='vmap'")
        plan[name] = _Layer(module, entry, tuple(groups))
    return plan


def hooks_supported(model: nn.Module, index: UnitIndex) -> bool:
    try:
        hook_plan(model, index)
    except UnsupportedModuleError:
        return False
    return True


class HookSession:
    """Forward hooks that exist only inside ``with``; captured tensors live here, never on modules.

    Each planned module's input is kept from its forward call until its output
    gradient arrives; then its reducer runs and the input is dropped, so at
    most one layer's per-sample work is alive at a time.
    """

    def __init__(self, plan: dict[str, _Layer], aggregation: Aggregation, chunk_size: int | None):
        self._plan = plan
        self._aggregation = aggregation
        self._chunk_size = chunk_size
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._called: set[str] = set()
        self._results: dict[int, torch.Tensor] = {}
        self.output_edges: list = []

    def __enter__(self) -> HookSession:
        try:
            for name, layer in self._plan.items():
                self._handles.append(layer.module.register_forward_hook(partial(self._on_forward, name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self.output_edges.clear()

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if name in self._called:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__qualname__}) is called more than once in one forward pass; "
                "its per-sample gradient is a sum over the calls, which the hooks backend cannot split: "
                "use backend='vmap'")
        self._called.add(name)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        self._inputs[name] = args[0].detach()
        # A tensor hook sees the gradient w.r.t. this output as produced, even if a
        # later in-place op (ReLU(inplace=True)) overwrites the tensor.
        output.register_hook(partial(self._on_backprop, name))
        self.output_edges.append(torch.autograd.graph.get_gradient_edge(output))

    def _on_backprop(self, name: str, backprops: torch.Tensor) -> None:
        layer = self._plan[name]
        activations = self._inputs.pop(name)
        reduced = layer.entry.reducer(layer.module, activations, backprops.detach(), layer.groups,
                                      self._aggregation, self._chunk_size)
        for group, values in zip(layer.groups, reduced):
            self._results[group.layer] = values

    def assemble(self, batch: int, num_units: int, like: torch.Tensor) -> torch.Tensor:
        """``[B, F]``: each group's reduced values at its offset; zeros where no gradient flowed."""
        profiles = like.new_zeros(batch, num_units)
        for layer in self._plan.values():
            for group in layer.groups:
                if group.layer in self._results:
                    profiles[:, group.offset:group.stop] = self._results[group.layer]
        return profiles


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


BACKENDS: dict[str, Backend] = {"loop": loop_backend, "vmap": vmap_backend, "hooks": hooks_backend}
