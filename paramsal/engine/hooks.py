"""The hooks backend's bookkeeping: every use of every unit parameter in a forward pass.

A reducer turns one call's saved input and output gradient into that call's
contribution to the per-sample gradient of the parameters it used. That is
the whole gradient only if the call is the parameter's one use, so the
session watches the forward pass (and the loss) at two levels:

* a :class:`~torch.overrides.TorchFunctionMode` sees every torch function
  call that receives a unit parameter. Calls of a function in
  :data:`~paramsal.kernels.registry.OP_RULES` (``F.conv2d``, ``F.linear``,
  ...) are captured where they happen: inside their module, on a weight
  shared with another module, in a module's second call, or through
  ``F.conv2d(x, self.conv.weight)`` anywhere;
* module hooks serve the first call of modules with a user-registered reducer.

Before the backward pass, :meth:`HookSession.check` walks the autograd graph
from the losses and finds every edge into a unit parameter. Each edge must
come from an autograd node created during a served call of that parameter
(nodes are numbered in creation order, so a call owns the interval of numbers
it used); any other edge is a use the reducers would miss, and the session
refuses, naming the parameter and the call. A parameter with several served
uses gets the sum of their whole per-sample gradients before its units are
reduced (the ``|.|`` of a sum is not the sum of the ``|.|``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from paramsal.engine.graph import caller_outside, parameter_edges
from paramsal.engine.plan import Layer
from paramsal.engine.units import UnitGroup, UnitIndex
from paramsal.errors import engine_code, unsupported_use
from paramsal.kernels.chunks import auto_chunk, chunk_slices
from paramsal.kernels.reduce import Aggregation, reduce_grad
from paramsal.kernels.registry import OP_RULES, GradSample, OpRule, Reducer

_next_node = torch._C._autograd._get_sequence_nr


@dataclass(frozen=True)
class _ModuleCall:
    """A call of a module served by its own reducer, open while its forward runs: only its first call is served
    whole (later calls' uses are recorded op by op); its autograd nodes are numbered from ``first_node``."""

    name: str
    first_call: bool
    first_node: int


@dataclass(eq=False)
class _Use:
    """One served call: the unit parameters it used, its input, and (after backward) its output gradient.

    ``groups`` carry the parameter's role in this call as ``attr``
    ("weight", "bias"), which is what the reducer reads. The call created the
    autograd nodes numbered ``first <= n < stop``. Once the forward pass is
    checked, ``sole_use`` are the groups this call is the only use of (reduced
    as soon as the output gradient arrives) and ``awaits_sum`` says whether
    the input and gradient must be kept for a sum over several calls.
    """

    where: str
    layer: Any
    reducer: Reducer
    grad_sample: GradSample | None
    groups: tuple[UnitGroup, ...]
    first: int
    stop: int
    activations: torch.Tensor | None = None
    backprops: torch.Tensor | None = field(default=None, repr=False)
    sole_use: tuple[UnitGroup, ...] = ()
    awaits_sum: bool = False
    #: The reducer takes bf16/fp16 captures as they are (:attr:`~paramsal.kernels.registry.OpRule.reduced_precision`).
    reduced_precision: bool = False

    def owns(self, node: int) -> bool:
        return self.first <= node < self.stop


@dataclass(frozen=True)
class _Call:
    """A call no rule serves that passed unit parameters and built autograd nodes: named if it is a use."""

    name: str
    params: tuple[str, ...]
    first: int
    stop: int
    location: str


class HookSession:
    """The hooks backend's state for one batch; hooks and tracking exist only inside ``with``.

    Captured tensors live here, never on modules or parameters. Usage::

        with HookSession(plan, index, aggregation, chunk_size) as session:
            with session.tracking():
                losses = loss_fn(model(x), y)
            session.check(losses)
            torch.autograd.grad(losses.sum(), x_or_session.output_edges)
            profiles = session.assemble(len(x), like)
    """

    def __init__(self, plan: dict[str, Layer], index: UnitIndex, aggregation: Aggregation,
                 chunk_size: int | None, dtype: torch.dtype | None = None, batch: int | None = None):
        """``dtype``: what the reducers compute in (float32 under autocast); None: the captured tensors' own.
        ``batch``: the samples of the forward pass, to which a rule may widen an input shared by all of them."""
        self._plan = plan
        self._batch = batch
        self._dtype = dtype
        self._index = index
        self._aggregation = aggregation
        self._chunk_size = chunk_size
        self._module_reducers = {name: layer for name, layer in plan.items() if layer.entry.op is None}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._open_modules: list[_ModuleCall] = []  # the module-reducer calls the forward pass is inside
        self._calls_of: dict[str, int] = {}
        self._params: dict[int, tuple[torch.Tensor, UnitGroup]] = {}
        self._uses_of: dict[int, list[_Use]] = {}
        self._uses: list[_Use] = []
        self._unserved_calls: list[_Call] = []
        self._results: dict[int, torch.Tensor] = {}
        self._summed: dict[int, list[_Use]] = {}
        self.output_edges: list = []

    def __enter__(self) -> HookSession:
        try:
            for layer in self._plan.values():
                for group in layer.groups:
                    param = layer.module.get_parameter(group.attr)
                    self._params[id(param)] = (param, group)
            for name, layer in self._module_reducers.items():
                self._handles.append(layer.module.register_forward_pre_hook(partial(self._before_module, name)))
                self._handles.append(layer.module.register_forward_hook(partial(self._after_module, name),
                                                                        prepend=True))
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
        self._uses_of.clear()
        self._uses.clear()
        self._summed.clear()
        self.output_edges.clear()

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Around the forward pass and the loss: records every call that uses a unit parameter."""
        with _Tracker(self):
            yield

    # ------------------------------------------------------------------ forward: what each call used

    def on_call(self, func, args: tuple, kwargs: dict, found: list[int]):
        """Runs a torch function that received unit parameters (``found``: their ids) and records the use."""
        rule = OP_RULES.get(func)
        if rule is not None and rule.widen is not None and self._batch:
            args, kwargs = rule.widen(args, kwargs, self._batch)
        if rule is not None and rule.decompose is not None:
            out = rule.decompose(args, kwargs, self._served_linear)
            if out is not None:
                return out
        first = _next_node()
        out = func(*args, **kwargs)
        stop = _next_node()
        if stop == first:
            return out  # no autograd node: a metadata query or a use no gradient flows through
        with engine_code("tracking of parameter uses"):
            self._record(func, rule, args, kwargs, found, first, stop, out)
        return out

    def _served_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        found = [id(p) for p in (weight, bias) if id(p) in self._params]
        return self.on_call(F.linear, (x, weight, bias), {}, found) if found else F.linear(x, weight, bias)

    def _record(self, func, rule: OpRule | None, args: tuple, kwargs: dict, found: list[int], first: int, stop: int,
                out) -> None:
        owner = self._open_modules[-1] if self._open_modules else None
        if owner is not None and owner.first_call:
            owned = {id(g) for g in self._module_reducers[owner.name].groups}
            found = [key for key in found if id(self._params[key][1]) not in owned]
            if not found:
                return  # served by the module's own reducer
        main = rule.output(out) if rule is not None else None  # the output the rule's gradient is taken at
        if rule is not None and isinstance(main, torch.Tensor) and main.requires_grad:
            with torch.no_grad():
                layer, inputs, roles = rule.parse(args, kwargs)
            by_role = [(role, id(p)) for role, p in roles.items() if p is not None and id(p) in self._params]
            if sorted(key for _, key in by_role) == sorted(found):
                groups = tuple(dataclasses.replace(self._params[key][1], attr=role) for role, key in by_role)
                use = _Use(resolve_name(func), layer, rule.reducer, rule.grad_sample, groups, first, stop,
                           activations=inputs.detach(), reduced_precision=rule.reduced_precision)
                self._capture(use, main)
                return
        names = tuple(self._params[key][1].param_name for key in found)
        self._unserved_calls.append(_Call(resolve_name(func) or repr(func), names, first, stop, caller_outside()))

    def _before_module(self, name: str, module: nn.Module, args: tuple) -> None:
        with engine_code("module hook"):
            calls = self._calls_of[name] = self._calls_of.get(name, 0) + 1
            self._open_modules.append(_ModuleCall(name, calls == 1, _next_node()))

    def _after_module(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        with engine_code("module hook"):
            call = self._open_modules.pop()
            first_call, first = call.first_call, call.first_node
            layer = self._module_reducers[name]
            if first_call and not isinstance(output, torch.Tensor):
                self._unserved_calls.append(_Call(
                    f"module {name!r} ({type(module).__qualname__}), whose output is not one tensor", tuple(
                        g.param_name for g in layer.groups), first, _next_node(), ""))
            if not first_call or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # a second call's uses are recorded op by op; an output without gradient has no use
            use = _Use(f"module {name!r} ({type(module).__qualname__})", module, layer.entry.reducer, None,
                       layer.groups, first, _next_node(), activations=args[0].detach())
            self._capture(use, output)

    def _capture(self, use: _Use, output: torch.Tensor) -> None:
        # A tensor hook sees the gradient w.r.t. this output as produced, even if a
        # later in-place op (ReLU(inplace=True)) overwrites the tensor.
        output.register_hook(partial(self._on_backprop, use))
        self.output_edges.append(torch.autograd.graph.get_gradient_edge(output))
        self._uses.append(use)
        for group in use.groups:
            self._uses_of.setdefault(group.position, []).append(use)

    def served_inputs(self) -> list[tuple[str, str, Any]]:
        """``(call, first parameter's name, input)`` of every served call of the forward pass, in call order."""
        return [(use.where, use.groups[0].param_name, use.activations) for use in self._uses]

    # ------------------------------------------------------------------ between forward and backward

    def check(self, losses: torch.Tensor) -> None:
        """Proves every path from the losses into a unit parameter runs through a served call.

        Raises:
            UnsupportedUseError: naming the parameter and the call that used it
                otherwise (or the uses that cannot be summed).
        """
        if losses.grad_fn is None:
            return
        live: dict[int, list[_Use]] = {}
        unserved = []
        tensors = {key: param for key, (param, _) in self._params.items()}
        for key, node, node_name in parameter_edges(losses.grad_fn, tensors):
            group = self._params[key][1]
            uses = [u for u in self._uses_of.get(group.position, ()) if u.owns(node)]
            if not uses:
                unserved.append((group.param_name, node, node_name))
            for use in uses:
                if use not in live.setdefault(group.position, []):
                    live[group.position].append(use)
        if unserved:
            raise unsupported_use(self._describe(unserved))
        self._summed = {position: uses for position, uses in live.items() if len(uses) > 1}
        for position, uses in self._summed.items():
            opaque = [u.where for u in uses if u.grad_sample is None]
            if opaque:
                name = self._index.groups[position].param_name
                raise unsupported_use(
                    f"parameter {name!r} is used by {len(uses)} calls ({', '.join(u.where for u in uses)}); its "
                    f"per-sample gradient is their sum, but the reducer of {opaque[0]} gives units, not whole "
                    "gradients")
        for uses in self._uses_of.values():
            for use in uses:
                use.sole_use = tuple(g for g in use.groups if g.position not in self._summed)
                use.awaits_sum = len(use.sole_use) < len(use.groups)

    def _describe(self, unserved: list[tuple[str, int, str]]) -> str:
        name, node, node_name = unserved[0]
        call = next((c for c in self._unserved_calls if c.first <= node < c.stop and name in c.params), None)
        how = (f"passed to {call.name}{call.location}" if call is not None else
               f"used by an operation paramsal cannot see (autograd node {node_name})")
        others = len({n for n, _, _ in unserved}) - 1
        more = f" ({others} more parameter(s) too)" if others > 0 else ""
        return (f"parameter {name!r} is {how}, outside the calls the hooks backend serves (convolutions, "
                f"F.linear, F.embedding, the norms, attention, registered modules){more}; its per-sample "
                "gradient would miss that use")

    # ------------------------------------------------------------------ backward and assembly

    def _on_backprop(self, use: _Use, backprops: torch.Tensor) -> None:
        backprops = backprops.detach()
        if use.sole_use and use.activations is not None:
            x, gy = (use.activations, backprops) if use.reduced_precision else \
                (self._computed(use.activations), self._computed(backprops))
            with _autocast_off(gy):
                reduced = use.reducer(use.layer, x, gy, use.sole_use, self._aggregation, self._chunk_size)
            for group, values in zip(use.sole_use, reduced):
                self._results[group.position] = values
        if use.awaits_sum:
            use.backprops = self._computed(backprops)
        else:
            use.activations = None

    def _computed(self, t: torch.Tensor) -> torch.Tensor:
        """A captured tensor in the reducers' dtype: a lowered forward's bf16/fp16 never reaches a contraction."""
        return t if self._dtype is None or not t.is_floating_point() else t.to(self._dtype)

    def assemble(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``[B, F]``: each group's reduced values at its offset; zeros where no gradient flowed."""
        for position, uses in self._summed.items():
            arrived = [u for u in uses if u.backprops is not None]
            if arrived:
                self._results[position] = self._summed_units(self._index.groups[position], arrived, batch)
        profiles = like.new_zeros(batch, len(self._index))
        for group in self._index:
            if group.position in self._results:
                profiles[:, group.offset:group.stop] = self._results[group.position]
        return profiles

    def _summed_units(self, group: UnitGroup, uses: Sequence[_Use], batch: int) -> torch.Tensor:
        """Units of the sum of several calls' whole per-sample gradients, a chunk of samples at a time."""
        parts = [_summand(u, group) for u in uses]
        numel = int(torch.Size(group.shape).numel())
        chunk = self._chunk_size or auto_chunk(2 * numel, batch, parts[0][3])
        reduced = []
        with _autocast_off(parts[0][3]):
            for s in chunk_slices(batch, chunk):
                total = torch.stack([grad_sample(layer, self._computed(x[s]), gy[s], role)
                                     for grad_sample, layer, x, gy, role in parts]).sum(0)
                reduced.append(reduce_grad(total, group, self._aggregation))
        return torch.cat(reduced)


def _summand(use: _Use, group: UnitGroup) -> tuple[GradSample, Any, torch.Tensor, torch.Tensor, str]:
    """What a use adds to a sum: its rule's grad_sample, geometry, input, output gradient and the group's role.

    Only uses whose gradient arrived are summed, and :meth:`HookSession.check`
    refused any without a grad_sample, so each part is there.
    """
    assert use.grad_sample is not None and use.activations is not None and use.backprops is not None
    role = next(g.attr for g in use.groups if g.position == group.position)
    return use.grad_sample, use.layer, use.activations, use.backprops, role


def _autocast_off(like: torch.Tensor) -> AbstractContextManager:
    """Reductions compute in the dtype they are given, whatever autocast region the backward pass runs in.

    Outside any region (the Profiler switches autocast off around float32
    calls) nothing is entered: a context per reducer call is a cost on every layer of every batch.
    """
    if not torch.is_autocast_enabled(like.device.type):
        return nullcontext()
    return torch.autocast(like.device.type, enabled=False)


class _Tracker(TorchFunctionMode):
    """Hands every torch function call that receives a unit parameter to the session."""

    def __init__(self, session: HookSession):
        super().__init__()
        self._session = session
        self._ids = session._params

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = [id(a) for a in _tensors(args, kwargs) if id(a) in self._ids]
        if not found:
            return func(*args, **kwargs)
        return self._session.on_call(func, args, kwargs, list(dict.fromkeys(found)))


def _tensors(args: tuple, kwargs: dict) -> Iterator[Any]:
    """The arguments and the members of list/tuple arguments (``torch.cat([a, b])``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value
