"""The named unit schemes: which elements of which parameters each one makes a unit.

:func:`selector` gives, for a scheme name (or a user's callable), a function
that is asked about each parameter in turn and answers with its partition, or
None to leave it out; a scheme whose units span parameters (an MLP's neurons, a
grouped-query attention's heads) also names the :class:`Join` that a
parameter's units belong to. :func:`paramsal.units_of` numbers the answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, Union

import torch
from torch import nn

from paramsal.errors import InputError
from paramsal.options import UNIT_SCHEMES

Partition = Literal["rows", "columns", "custom", "compound"]

#: A user partition: ``fn(param_name, param) -> LongTensor | None``. The tensor
#: has the parameter's shape and gives each element its unit, numbered from 0
#: within that parameter; -1 leaves an element out. ``None`` skips the parameter.
UnitAssigner = Callable[[str, torch.Tensor], Union[torch.Tensor, None]]

UnitsSpec = Union[str, UnitAssigner]


#: The convolutions whose output channels are filters.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The normalization layers whose affine weight and bias carry one unit per channel (``units="norm"``).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class Join(NamedTuple):
    """Which parameters' units are one unit: those of one module that a scheme gives the same kind."""

    module_name: str
    kind: str  # "neurons", "query_heads", "kv_heads": the compound group's name within its module


_Choice = Union[tuple[Partition, Union[torch.Tensor, None]], tuple[Partition, Union[torch.Tensor, None], Join], None]

#: ``select(param_name, param, module) -> choice``: a scheme's answer for one parameter.
Select = Callable[[str, torch.Tensor, nn.Module], _Choice]


def selector(model: nn.Module, units: UnitsSpec) -> Select:
    """The answer of scheme ``units`` (a name of :data:`~paramsal.options.UNIT_SCHEMES` or a callable) for each
    parameter of ``model``."""
    if units == "heads":
        return _heads_of(model)
    if units == "neurons":
        return _neurons_of(model)
    return _scheme(units)


def _scheme(units: UnitsSpec) -> Select:
    if callable(units):
        def custom(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
            assignment = units(name, param)
            return None if assignment is None else ("custom", assignment)
        return custom
    if units == "filters":
        return lambda name, p, m: ("rows", None) if p.dim() == 4 else None
    if units == "conv":
        return lambda name, p, m: ("rows", None) if _is_weight_of(name, m, CONV_TYPES) else None
    if units == "conv+linear":
        return lambda name, p, m: ("rows", None) if _is_weight_of(name, m, CONV_TYPES + (nn.Linear,)) else None
    if units == "linear-columns":
        return lambda name, p, m: ("columns", None) if _is_weight_of(name, m, (nn.Linear,)) else None
    if units == "linear-rows":
        return lambda name, p, m: ("rows", None) if _is_weight_of(name, m, (nn.Linear,)) or _is_projection_of(
            name, m) else None
    if units == "norm":
        return lambda name, p, m: ("rows", None) if _is_norm(m) and name.rpartition(".")[2] in (
            "weight", "bias") else None
    if units == "embedding-rows":
        return lambda name, p, m: ("rows", None) if _is_weight_of(name, m, (nn.Embedding,)) else None
    if units == "layer-scale":
        return _layer_scale
    if units == "position-embedding":
        return _position_embedding
    raise InputError(f"unknown units {units!r}; expected one of {', '.join(UNIT_SCHEMES)} or a callable")


#: ``nn.MultiheadAttention``'s input projections (packed Q/K/V, or one of the three).
_IN_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: Where a transformers-style attention module keeps its per-head projections: Q/K/V layers (one unit per head's
#: rows), the output layer (one per head's columns), and the output layer BERT's family keeps beside it, in the
#: parent's ``output.dense``.
_QKV_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v")
_OUT_NAMES = ("out_proj", "o_proj", "o")
_SIBLING_OUT = ("output", "dense")


#: A grouped-query attention's projections (the Llama family's names): the unit each joins.
_GROUPED_QUERY = {"q_proj": ("rows", "query_heads"), "o_proj": ("columns", "query_heads"),
                  "k_proj": ("rows", "kv_heads"), "v_proj": ("rows", "kv_heads")}


def _heads_of(model: nn.Module) -> Select:
    """One unit per attention head of each attention's Q, K, V (rows of the input projections) and output
    projection (the columns each head's values feed): ``nn.MultiheadAttention``, and modules that hold their
    projections as Linear layers beside a ``head_dim`` / ``attention_head_size`` (transformers' BERT, GPT-Neo,
    ...). A grouped-query attention (a ``num_key_value_groups`` beside the ``head_dim``: transformers' Llama,
    Mistral, Qwen2, ...) has one unit per query head, over its Q rows and O columns, and one per key/value head,
    over its K and V rows."""
    heads: dict[str, tuple[str, int, Join | None]] = {}  # weight name -> (axis, head width, join)
    modules = dict(model.named_modules())
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            for attr in _IN_PROJECTIONS:
                heads[prefix + attr] = ("rows", module.head_dim, None)
            heads[prefix + "out_proj.weight"] = ("columns", module.head_dim, None)
            continue
        width = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        if not isinstance(width, int) or width < 1:
            continue
        if isinstance(getattr(module, "num_key_value_groups", None), int) and all(
                isinstance(modules.get(prefix + child), nn.Linear) for child in _GROUPED_QUERY):
            for child, (axis, kind) in _GROUPED_QUERY.items():
                heads[f"{prefix}{child}.weight"] = (axis, width, Join(name, kind))
            continue
        for axis, children in (("rows", _QKV_NAMES), ("columns", _OUT_NAMES)):
            for child in children:
                if isinstance(modules.get(prefix + child), nn.Linear):
                    heads[f"{prefix}{child}.weight"] = (axis, width, None)
        parent = name.rpartition(".")[0]
        sibling = ".".join(filter(None, (parent, *_SIBLING_OUT)))
        if parent and isinstance(modules.get(sibling), nn.Linear):
            heads[sibling + ".weight"] = ("columns", width, None)

    def select(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
        if name not in heads:
            return None
        axis, width, join = heads[name]
        if axis == "rows":
            assignment = (torch.arange(param.shape[0]) // width)[:, None].expand(param.shape).contiguous()
        else:
            assignment = (torch.arange(param.shape[1]) // width)[None, :].expand(param.shape).contiguous()
        return ("custom", assignment) if join is None else ("custom", assignment, join)

    return select


#: An MLP's Linear layers into its hidden neurons (one row each) and out of them (one column each).
_NEURONS_IN = ("gate_proj", "up_proj", "fc1", "c_fc")
_NEURONS_OUT = ("down_proj", "fc2", "c_proj")


def _neurons_of(model: nn.Module) -> Select:
    """One unit per hidden neuron of each MLP: a module with Linear layers into the neurons (``gate_proj`` and
    ``up_proj``, or ``fc1``) and one out of them (``down_proj``, or ``fc2``), all as wide as the hidden layer.
    A neuron's unit is its rows of the first and its column of the last: every weight it reads or writes with."""
    roles: dict[str, tuple[Partition, Join]] = {}
    for name, module in model.named_modules():
        linear = {child: m for child, m in module.named_children() if isinstance(m, nn.Linear)}
        into = [child for child in _NEURONS_IN if child in linear]
        out = [child for child in _NEURONS_OUT if child in linear]
        if not into or len(out) != 1 or any(linear[c].out_features != linear[out[0]].in_features for c in into):
            continue
        prefix, join = f"{name}." if name else "", Join(name, "neurons")
        roles.update({f"{prefix}{child}.weight": ("rows", join) for child in into})
        roles[f"{prefix}{out[0]}.weight"] = ("columns", join)

    def select(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
        return (roles[name][0], None, roles[name][1]) if name in roles else None

    return select


#: What layer-scale and position-embedding parameters are called (torchvision's ConvNeXt and ViT, timm).
_LAYER_SCALE_NAMES = ("layer_scale", "gamma", "gamma_1", "gamma_2", "layer_scale_1", "layer_scale_2")
_POSITION_NAMES = ("pos_embedding", "pos_embed", "position_embedding", "position_embeddings")


def _layer_scale(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
    """One unit per channel of a per-channel scale (``[C]``, ``[C, 1, 1]``): the only dimension longer than 1."""
    long = [d for d, size in enumerate(param.shape) if size > 1]
    if name.rpartition(".")[2] not in _LAYER_SCALE_NAMES or len(long) != 1:
        return None
    return _along(param, long[0])


def _position_embedding(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
    """One unit per position of a learned position embedding ``[1, T, D]``: the positions' dimension."""
    if name.rpartition(".")[2] not in _POSITION_NAMES or isinstance(module, nn.Embedding) or param.dim() < 2:
        return None
    return _along(param, param.dim() - 2)


def _along(param: torch.Tensor, dim: int) -> _Choice:
    shape = [1] * param.dim()
    shape[dim] = param.shape[dim]
    return "custom", torch.arange(param.shape[dim]).reshape(shape).expand(param.shape).contiguous()


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: of :data:`NORM_TYPES`, or a transformers ``*RMSNorm`` (``LlamaRMSNorm``, ...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("RMSNorm")


def _is_weight_of(name: str, module: nn.Module, types: tuple[type, ...]) -> bool:
    return isinstance(module, types) and name.rpartition(".")[2] == "weight"


def _is_projection_of(name: str, module: nn.Module) -> bool:
    """An input projection of ``nn.MultiheadAttention`` (packed Q/K/V, or one of the three): Linear rows too."""
    return isinstance(module, nn.MultiheadAttention) and name.rpartition(".")[2] in _IN_PROJECTIONS

