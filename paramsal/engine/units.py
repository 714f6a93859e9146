"""Units: the partition of parameter elements that a saliency profile is reported on.

The paper calls units "filters": by default every parameter with 4 dims
contributes one unit per index of its first dim (a conv weight's output
channel), in ``model.named_parameters()`` order. That default is what the
authors' reference code computes and what their released statistics index, so
it never changes silently; every other partition is an explicit option.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import nn

from paramsal.errors import InputError
from paramsal.options import UNIT_SCHEMES

Partition = Literal["rows", "columns", "custom"]

#: A user partition: ``fn(param_name, param) -> LongTensor | None``. The tensor
#: has the parameter's shape and gives each element its unit, numbered from 0
#: within that parameter; -1 leaves an element out. ``None`` skips the parameter.
UnitAssigner = Callable[[str, torch.Tensor], Union[torch.Tensor, None]]

UnitsSpec = Union[str, UnitAssigner]


#: The convolutions whose output channels are filters.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The normalization layers whose affine weight and bias carry one unit per channel (``units="norm"``).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True, eq=False)
class UnitGroup:
    """The units carved out of one parameter.

    Attributes:
        param_name: name in ``model.named_parameters()``.
        module_name: path of the module owning the parameter ("" for the root).
        attr: attribute of the parameter on its module ("weight", "bias", ...).
        position: this group's place among the index's groups (the units table calls it ``layer``: with the
            default units, one group per conv layer).
        shape: the parameter's shape.
        partition: "rows" (one unit per index of dim 0), "columns" (one unit
            per index of dim 1 of a 2-D weight) or "custom" (``assignment``).
        num_units: number of units of this parameter.
        offset: position of the first unit in the concatenated profile.
        assignment: for "custom", the unit of each element, -1 for none.
        sizes: number of elements of each unit, ``[num_units]``.
    """

    param_name: str
    module_name: str
    attr: str
    position: int
    shape: tuple[int, ...]
    partition: Partition
    num_units: int
    offset: int
    sizes: torch.Tensor
    assignment: torch.Tensor | None = field(default=None, repr=False)

    @property
    def stop(self) -> int:
        return self.offset + self.num_units


@dataclass(frozen=True, eq=False)
class UnitIndex:
    """An ordered partition of (some of) a model's parameters into units.

    ``len(index)`` is the profile length F; ``index.groups`` lists the
    parameters in profile order; :meth:`columns` describes each unit.
    """

    scheme: str
    groups: tuple[UnitGroup, ...]

    def __len__(self) -> int:
        return self.groups[-1].stop if self.groups else 0

    def __iter__(self) -> Iterator[UnitGroup]:
        return iter(self.groups)

    @property
    def param_names(self) -> list[str]:
        return [g.param_name for g in self.groups]

    def columns(self) -> dict[str, list]:
        """One entry per unit in each column: unit_id, param, module, layer, channel, size (the run directory's
        ``units.parquet``, :func:`paramsal.rundir.units_table`)."""
        columns: dict[str, list] = {k: [] for k in ("unit_id", "param", "module", "layer", "channel", "size")}
        for g in self.groups:
            columns["unit_id"].extend(range(g.offset, g.stop))
            columns["param"].extend([g.param_name] * g.num_units)
            columns["module"].extend([g.module_name] * g.num_units)
            columns["layer"].extend([g.position] * g.num_units)
            columns["channel"].extend(range(g.num_units))
            columns["size"].extend(g.sizes.tolist())
        return columns

    def param_of(self, unit: int) -> str:
        """The parameter unit ``unit`` belongs to."""
        return next(g.param_name for g in self.groups if g.offset <= unit < g.stop)

    def fingerprint(self) -> str:
        """A short hash of the partition, to tell runs made with other units apart."""
        desc = [(g.param_name, g.shape, g.partition, g.num_units, _digest(g.assignment)) for g in self.groups]
        return hashlib.sha256(json.dumps([self.scheme, desc]).encode()).hexdigest()[:16]


def units_of(model: nn.Module, units: UnitsSpec = "filters") -> UnitIndex:
    """Partitions a model's parameters into saliency units.

    Args:
        model: the network; only ``named_parameters()`` and module types are read.
        units: "filters" (default: every 4-dim parameter, one unit per output
            channel, exactly the paper's reference code), "conv" (Conv1d/2d/3d
            weights, per output channel), "conv+linear" (plus Linear weight
            rows), "linear-columns" (Linear weight columns, the paper's
            column-wise variant for transformers), "linear-rows" (Linear
            weight rows and attention input projections' rows), "embedding-rows"
            (one unit per row of an Embedding table, i.e. per token), "heads"
            (one unit per head of each attention's Q, K, V and output
            projections: ``nn.MultiheadAttention`` and transformers-style
            attention modules with Linear projections), "norm" (BatchNorm / LayerNorm / GroupNorm
            weight and bias, one unit per channel), "layer-scale" (one unit
            per channel of each layer-scale vector: ConvNeXt's
            ``layer_scale``, timm's ``gamma``), "position-embedding" (one unit
            per position of each learned position embedding ``[1, T, D]``:
            ViT's ``pos_embedding``, timm's ``pos_embed``), or a callable
            ``fn(param_name, param) -> LongTensor | None`` giving each element's
            unit (the general scatter path).

    Returns:
        The unit index; ``len()`` is the profile length.
    """
    select = _heads_of(model) if units == "heads" else _scheme(units)
    groups: list[UnitGroup] = []
    offset = 0
    for name, param in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        chosen = select(name, param, module)
        if chosen is None:
            continue
        partition, assignment = chosen
        group = _make_group(name, module_name, attr, len(groups), tuple(param.shape), partition, assignment, offset)
        groups.append(group)
        offset = group.stop
    if not groups:
        raise InputError(f"units={units!r} selects no parameter of {type(model).__name__}; "
                         f"choose another scheme ({', '.join(UNIT_SCHEMES)}) or pass a callable")
    return UnitIndex(scheme=units if isinstance(units, str) else getattr(units, "__name__", "custom"),
                     groups=tuple(groups))


_Choice = Union[tuple[Partition, Union[torch.Tensor, None]], None]


def _scheme(units: UnitsSpec) -> Callable[[str, torch.Tensor, nn.Module], _Choice]:
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
        return lambda name, p, m: ("rows", None) if isinstance(m, NORM_TYPES) and name.rpartition(".")[2] in (
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


def _heads_of(model: nn.Module) -> Callable[[str, torch.Tensor, nn.Module], _Choice]:
    """One unit per attention head of each attention's Q, K, V (rows of the input projections) and output
    projection (the columns each head's values feed): ``nn.MultiheadAttention``, and modules that hold their
    projections as Linear layers beside a ``head_dim`` / ``attention_head_size`` (transformers' BERT, GPT-Neo,
    Llama, ...)."""
    heads: dict[str, tuple[str, int]] = {}  # weight name -> (axis, head width)
    modules = dict(model.named_modules())
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            for attr in _IN_PROJECTIONS:
                heads[prefix + attr] = ("rows", module.head_dim)
            heads[prefix + "out_proj.weight"] = ("columns", module.head_dim)
            continue
        width = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        if not isinstance(width, int) or width < 1:
            continue
        for axis, children in (("rows", _QKV_NAMES), ("columns", _OUT_NAMES)):
            for child in children:
                if isinstance(modules.get(prefix + child), nn.Linear):
                    heads[f"{prefix}{child}.weight"] = (axis, width)
        parent = name.rpartition(".")[0]
        sibling = ".".join(filter(None, (parent, *_SIBLING_OUT)))
        if parent and isinstance(modules.get(sibling), nn.Linear):
            heads[sibling + ".weight"] = ("columns", width)

    def select(name: str, param: torch.Tensor, module: nn.Module) -> _Choice:
        if name not in heads:
            return None
        axis, width = heads[name]
        if axis == "rows":
            return "custom", (torch.arange(param.shape[0]) // width)[:, None].expand(param.shape).contiguous()
        return "custom", (torch.arange(param.shape[1]) // width)[None, :].expand(param.shape).contiguous()

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


def _is_weight_of(name: str, module: nn.Module, types: tuple[type, ...]) -> bool:
    return isinstance(module, types) and name.rpartition(".")[2] == "weight"


def _is_projection_of(name: str, module: nn.Module) -> bool:
    """An input projection of ``nn.MultiheadAttention`` (packed Q/K/V, or one of the three): Linear rows too."""
    return isinstance(module, nn.MultiheadAttention) and name.rpartition(".")[2] in _IN_PROJECTIONS


def _make_group(name: str, module_name: str, attr: str, position: int, shape: tuple[int, ...],
                partition: Partition, assignment: torch.Tensor | None, offset: int) -> UnitGroup:
    numel = int(torch.Size(shape).numel())
    if partition == "rows":
        num_units = shape[0]
        sizes = torch.full((num_units,), numel // num_units, dtype=torch.long)
    elif partition == "columns":
        num_units = shape[1]
        sizes = torch.full((num_units,), shape[0], dtype=torch.long)
    else:
        assignment = _check_assignment(name, shape, assignment)
        kept = assignment[assignment >= 0]
        num_units = int(kept.max()) + 1 if kept.numel() else 0
        sizes = torch.bincount(kept, minlength=num_units)
        if num_units == 0 or bool((sizes == 0).any()):
            empty = (sizes == 0).nonzero().flatten().tolist()[:5]
            raise InputError(f"unit assignment of {name!r} has empty units {empty} "
                             "(units must be numbered 0..m-1 with at least one element each)")
    return UnitGroup(param_name=name, module_name=module_name, attr=attr, position=position, shape=shape,
                     partition=partition, num_units=num_units, offset=offset, sizes=sizes,
                     assignment=assignment)


def _check_assignment(name: str, shape: tuple[int, ...], assignment: object) -> torch.Tensor:
    if not isinstance(assignment, torch.Tensor) or assignment.dtype not in (torch.int32, torch.int64):
        raise InputError(f"the unit callable must return an integer tensor (or None) for {name!r}, "
                         f"got {type(assignment).__name__}")
    if tuple(assignment.shape) != shape:
        raise InputError(f"unit assignment of {name!r} has shape {tuple(assignment.shape)}, "
                         f"the parameter has {shape}")
    if bool((assignment < -1).any()):
        raise InputError(f"unit assignment of {name!r} has values below -1")
    return assignment.detach().to("cpu", torch.long)


def _digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16]
