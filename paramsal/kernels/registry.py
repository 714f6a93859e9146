"""The one registry of per-layer reducers, keyed by module type, and the rules for torch functions.

A reducer turns a layer's saved input and its output gradient into per-sample,
per-unit saliency ``[B, units]`` for each of the layer's parameters that carry
units; it never returns the full per-sample gradient.

The built-in layers (Conv1d/2d/3d, Linear, Embedding, the norms' affine
parameters; ``nn.MultiheadAttention`` through ``F.multi_head_attention_forward``)
are served one level lower: their forward is one call of a torch function on
their parameters, and :data:`OP_RULES` serves such calls wherever they happen
(inside the module or a subclass with its own forward, on a weight shared with
another module, in a second call, or through ``F.conv2d(x, self.conv.weight)``
elsewhere), and so a parameter added to or multiplied with a batch (position
embeddings, layer scales). A module of no registered type is served the same
way (:func:`op_served`). A user's reducer serves the module's own call, so
lookup walks the module's MRO but finds a registered base only while the
subclass keeps that base's ``forward``: a subclass that computes something
else with the same weights would make that reducer wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paramsal.errors import InputError
from paramsal.kernels.attention import PARAMETERS as ATTENTION_PARAMETERS
from paramsal.kernels.attention import attention_call, attention_grad_sample, decomposed_attention, reduce_attention
from paramsal.kernels.conv import conv_call, conv_grad_sample, reduce_conv
from paramsal.kernels.elementwise import add_call, elementwise_grad_sample, mul_call, reduce_elementwise
from paramsal.kernels.embedding import embedding_call, embedding_grad_sample, embedding_widened, reduce_embedding
from paramsal.kernels.linear import linear_call, linear_grad_sample, reduce_linear
from paramsal.kernels.norm import (
    batch_norm_call,
    group_norm_call,
    layer_norm_call,
    norm_grad_sample,
    reduce_norm,
    rms_norm_call,
)
from paramsal.kernels.reduce import Aggregation, ParamUnits

#: ``reducer(layer, activations, backprops, groups, aggregation, chunk_size) -> [[B, U_g], ...]``
Reducer = Callable[[Any, torch.Tensor, torch.Tensor, Sequence[ParamUnits], Aggregation, "int | None"],
                   list[torch.Tensor]]


#: ``grad_sample(layer, activations, backprops, attr) -> [B, *param.shape]``: whole per-sample gradients.
GradSample = Callable[[Any, torch.Tensor, torch.Tensor, str], torch.Tensor]

#: ``parse(args, kwargs) -> (geometry, input, {role: parameter or None})`` of one call.
ParseCall = Callable[[tuple, dict], tuple[Any, torch.Tensor, "dict[str, torch.Tensor | None]"]]


@dataclass(frozen=True)
class OpRule:
    """How the calls of one torch function on unit parameters are served where they happen.

    Attributes:
        parse: the call's geometry (with the attribute names the reducer reads), input and parameters.
        reducer: as for modules, given the geometry in place of the layer.
        grad_sample: whole per-sample gradients, summed over the uses of a
            parameter used more than once before its units are reduced.
    """

    parse: ParseCall
    reducer: Reducer
    grad_sample: GradSample
    #: The output whose gradient the reducer takes (for a function that returns a tuple).
    output: Callable[[Any], Any] = lambda out: out
    #: ``widen(args, kwargs, batch) -> (args, kwargs)``: the call on an input shared by every sample made into
    #: the same call on one copy per sample, whose output broadcasts alike, so that each sample's gradient is
    #: apart (a position embedding looked up once for the whole batch).
    widen: Callable[[tuple, dict, int], tuple[tuple, dict]] | None = None
    #: ``decompose(args, kwargs, linear) -> output or None``: the call run as parts whose projections go through
    #: ``linear`` (served as Linear layers), which saves the rule's own pass; None where it does not apply.
    decompose: Callable[[tuple, dict, Callable[..., torch.Tensor]], Any] | None = None
    #: The reducer takes a bf16/fp16 forward's captures as they are (the fused kernel multiplies them on tensor
    #: cores, accumulating in float32; its torch paths make float32 copies themselves, where needed): no float32
    #: copy of every captured tensor first.
    reduced_precision: bool = False


OP_RULES: dict[Callable, OpRule] = {
    **{op: OpRule(conv_call, reduce_conv, conv_grad_sample, reduced_precision=True)
       for op in (torch.conv1d, torch.conv2d, torch.conv3d)},
    F.linear: OpRule(linear_call, reduce_linear, linear_grad_sample, reduced_precision=True),
    F.embedding: OpRule(embedding_call, reduce_embedding, embedding_grad_sample, widen=embedding_widened),
    F.batch_norm: OpRule(batch_norm_call, reduce_norm, norm_grad_sample),
    F.layer_norm: OpRule(layer_norm_call, reduce_norm, norm_grad_sample),
    F.group_norm: OpRule(group_norm_call, reduce_norm, norm_grad_sample),
    F.rms_norm: OpRule(rms_norm_call, reduce_norm, norm_grad_sample),
    **{op: OpRule(add_call, reduce_elementwise, elementwise_grad_sample) for op in (torch.add, torch.Tensor.add)},
    **{op: OpRule(mul_call, reduce_elementwise, elementwise_grad_sample) for op in (torch.mul, torch.Tensor.mul)},
    F.multi_head_attention_forward: OpRule(attention_call, reduce_attention, attention_grad_sample,
                                           output=lambda out: out[0], decompose=decomposed_attention),
}


@dataclass(frozen=True)
class ReducerEntry:
    """A registered reducer and the parameter attributes it handles.

    Attributes:
        op: for the built-in layers, the torch function their forward applies
            to their parameters once; the hooks backend then serves its calls
            through :data:`OP_RULES` wherever they happen. None: the reducer
            serves the module's own call.
    """

    reducer: Reducer
    params: frozenset[str]
    op: Callable | None = None


_BUILT_IN: dict[type[nn.Module], Callable[..., Any]] = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d,
                                                        nn.Conv3d: torch.conv3d, nn.Linear: F.linear,
                                                        nn.Embedding: F.embedding,
                                                        nn.modules.batchnorm._BatchNorm: F.batch_norm,
                                                        nn.LayerNorm: F.layer_norm, nn.GroupNorm: F.group_norm,
                                                        nn.RMSNorm: F.rms_norm}

_REGISTRY: dict[type[nn.Module], ReducerEntry] = {
    module_type: ReducerEntry(OP_RULES[op].reducer, frozenset({"weight", "bias"}), op)
    for module_type, op in _BUILT_IN.items()
}
_REGISTRY[nn.MultiheadAttention] = ReducerEntry(reduce_attention, frozenset(ATTENTION_PARAMETERS),
                                                F.multi_head_attention_forward)


def register_reducer(module_type: type[nn.Module], reducer: Reducer, *,
                     params: Sequence[str] = ("weight", "bias"), override: bool = False) -> None:
    """Registers the per-sample reducer of a module type.

    Args:
        module_type: the class; its subclasses match too while they keep its ``forward``.
        reducer: ``reducer(layer, activations, backprops, groups, aggregation,
            chunk_size)`` returning one ``[B, group.num_units]`` tensor per group.
            ``activations`` is the layer's first positional input, ``backprops``
            the gradient w.r.t. its output, both ``[B, ...]``.
        params: the parameter attributes (``"weight"``, ...) the reducer handles.
        override: replace an existing registration instead of raising.
    """
    if module_type in _REGISTRY and not override:
        raise InputError(f"a reducer for {module_type.__qualname__} is already registered; "
                         "pass override=True to replace it")
    _REGISTRY[module_type] = ReducerEntry(reducer, frozenset(params))


def unregister_reducer(module_type: type[nn.Module]) -> None:
    """Removes the reducer registered for exactly ``module_type``."""
    _REGISTRY.pop(module_type, None)


def find_reducer(module: nn.Module) -> ReducerEntry | None:
    """The reducer for ``module``: its type's, else its nearest registered base's.

    A user's reducer serves the module's own call, so a subclass matches only
    while it keeps that base's ``forward``. The built-in layers are served
    call by call, so any subclass matches (timm's ``Linear``, a ``LayerNorm2d``
    that permutes around ``F.layer_norm``): whatever its forward does with the
    parameters, the hooks backend serves the calls of :data:`OP_RULES` and
    refuses every other use it finds in the autograd graph.
    """
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None:
            return entry if entry.op is not None or type(module).forward is getattr(cls, "forward") else None
    return None


def op_served(module: nn.Module) -> ReducerEntry:
    """The entry of a module no reducer is registered for: its own parameters, served at the calls of
    :data:`OP_RULES` its forward makes (``F.linear(x, self.weight)`` in a user's layer); any other use is
    refused when the forward pass shows it."""
    return ReducerEntry(_no_module_reducer, frozenset(name for name, _ in module.named_parameters(recurse=False)),
                        op=_served_by_op_rules)


def _no_module_reducer(*args: Any) -> list[torch.Tensor]:
    raise AssertionError("an op-served module has no module reducer")  # the hooks backend never calls it


def _served_by_op_rules(*args: Any) -> Any:
    raise AssertionError("a marker, never called")
