"""Units: the partition of parameter elements that a saliency profile is reported on.

The paper calls units "filters": by default every parameter with 4 dims
contributes one unit per index of its first dim (a conv weight's output
channel), in ``model.named_parameters()`` order. That default is what the
authors' reference code computes and what their released statistics index, so
it never changes silently; every other partition is an explicit option.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from paramsal.engine.schemes import CONV_TYPES, NORM_TYPES, Join, Partition, UnitAssigner, UnitsSpec, selector
from paramsal.errors import InputError
from paramsal.options import UNIT_SCHEMES

__all__ = ["CONV_TYPES", "NORM_TYPES", "UnitAssigner", "UnitGroup", "UnitIndex", "UnitsSpec", "check_aggregation_of",
           "check_single_parameter", "unit_owners", "units_of"]


@dataclass(frozen=True, eq=False)
class UnitGroup:
    """The units carved out of one parameter (or, for a "compound" group, out of the parameters of its parts).

    Attributes:
        param_name: name in ``model.named_parameters()``.
        module_name: path of the module owning the parameter ("" for the root).
        attr: attribute of the parameter on its module ("weight", "bias", ...).
        position: this group's place among the index's groups (the units table calls it ``layer``: with the
            default units, one group per conv layer).
        shape: the parameter's shape.
        partition: "rows" (one unit per index of dim 0), "columns" (one unit
            per index of dim 1 of a 2-D weight), "custom" (``assignment``) or
            "compound" (units spanning the parameters of ``parts``).
        num_units: number of units of this parameter.
        offset: position of the first unit in the concatenated profile.
        assignment: for "custom", the unit of each element, -1 for none.
        sizes: number of elements of each unit, ``[num_units]``.
        parts: in an index whose units span parameters (:attr:`UnitIndex.compound`), the groups of one parameter
            each that this group's units are made of, unit for unit, at their offsets in
            :attr:`UnitIndex.pieces`; empty otherwise. A "compound" group (an MLP's neurons: the rows of
            ``gate_proj`` and ``up_proj`` and the column of ``down_proj``) has a name of its own, ``MODULE.KIND``,
            in place of a parameter's.
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
    parts: tuple[UnitGroup, ...] = field(default=(), repr=False)

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

    @property
    def compound(self) -> bool:
        """Whether some units span several parameters ("neurons", a grouped-query attention's "heads")."""
        return any(g.parts for g in self.groups)

    @functools.cached_property
    def pieces(self) -> UnitIndex:
        """The index of one parameter per group that the backends compute (itself unless :attr:`compound`);
        :meth:`combine` turns its profiles into this index's."""
        if not self.compound:
            return self
        return UnitIndex(self.scheme, tuple(sorted((part for g in self.groups for part in g.parts),
                                                   key=lambda part: part.position)))

    def combine(self, pieces: torch.Tensor) -> torch.Tensor:
        """``[N, len(pieces)] -> [N, len(self)]``: profiles of :attr:`pieces` made into this index's.

        A unit spanning parts is the mean of |g| over all of their elements: each part's mean weighted by its
        share of the unit's elements. (Only ``mean_abs`` combines so: ``|mean g|`` of a union is not a function
        of its parts' ``|mean g|``, so :func:`check_aggregation_of` refuses it.)
        """
        if not self.compound:
            return pieces
        columns = []
        for shares in self._shares(pieces.device, pieces.dtype):
            weighted = [pieces[:, start:stop] * share for start, stop, share in shares]
            columns.append(sum(weighted[1:], weighted[0]))
        return torch.cat(columns, 1)

    def _shares(self, device: torch.device, dtype: torch.dtype) -> list[list[tuple[int, int, torch.Tensor]]]:
        """Per group, each part's columns among the pieces and its share of each unit's elements, on the device
        once (a copy to a GPU per batch would wait for the batch's queued work)."""
        key = (device, dtype)
        if key not in self._shares_on:
            self._shares_on[key] = [[(part.offset, part.stop, (part.sizes.double() / group.sizes).to(device, dtype))
                                     for part in group.parts] for group in self.groups]
        return self._shares_on[key]

    @functools.cached_property
    def _shares_on(self) -> dict[tuple[torch.device, torch.dtype], list[list[tuple[int, int, torch.Tensor]]]]:
        return {}

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
        desc = [_described(g) + [_described(part) for part in g.parts] for g in self.groups]
        return hashlib.sha256(json.dumps([self.scheme, desc]).encode()).hexdigest()[:16]


def check_aggregation_of(index: UnitIndex, aggregation: str) -> None:
    """Refuses ``|mean g|`` for units that span parameters (:meth:`UnitIndex.combine` says why)."""
    if index.compound and aggregation != "mean_abs":
        raise InputError(f"units {index.scheme!r} span several parameters, whose units combine only as "
                         f"mean |g|: use aggregation 'mean_abs' (got {aggregation!r})")


def check_single_parameter(index: UnitIndex, what: str) -> None:
    """Refuses units that span parameters where ``what`` works on one parameter's units at a time."""
    spanning = [g.param_name for g in index if len(g.parts) > 1]
    if spanning:
        raise InputError(f"{what} works on units of one parameter each, but units {index.scheme!r} span several "
                         f"({spanning[0]}, ...); use units of one parameter each (linear-rows, linear-columns, "
                         "conv+linear)")


def unit_owners(group: UnitGroup) -> torch.Tensor:
    """``group.shape`` int64: the unit (counted from 0 within the group) of each element of a one-parameter group's
    parameter, -1 where an element belongs to none; what zeroing or stepping "a unit's weights" touches."""
    shape = group.shape
    if group.partition == "rows":
        return torch.arange(shape[0]).reshape(-1, *(1,) * (len(shape) - 1)).expand(shape)
    if group.partition == "columns":
        return torch.arange(shape[1])[None, :].expand(shape)
    if group.partition == "custom" and group.assignment is not None:
        return group.assignment
    raise InputError(f"the units of {group.param_name!r} span several parameters: ask each of its parts")


def _described(group: UnitGroup) -> list:
    """What a group contributes to the fingerprint (unchanged since runs were first fingerprinted)."""
    return [group.param_name, group.shape, group.partition, group.num_units, _digest(group.assignment)]


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
            attention modules with Linear projections; for the Llama family's
            grouped-query attention, one unit per query head over its rows of
            ``q_proj`` and columns of ``o_proj``, and one per key/value head over
            its rows of ``k_proj`` and ``v_proj``), "neurons" (one unit per
            hidden neuron of each MLP: its rows of ``gate_proj``/``up_proj``
            (or ``fc1``) and its column of ``down_proj`` (or ``fc2``), the
            weights it reads and writes with), "norm" (BatchNorm / LayerNorm /
            GroupNorm / RMSNorm weight and bias, one unit per channel), "layer-scale" (one unit
            per channel of each layer-scale vector: ConvNeXt's
            ``layer_scale``, timm's ``gamma``), "position-embedding" (one unit
            per position of each learned position embedding ``[1, T, D]``:
            ViT's ``pos_embedding``, timm's ``pos_embed``), or a callable
            ``fn(param_name, param) -> LongTensor | None`` giving each element's
            unit (the general scatter path).

    Returns:
        The unit index; ``len()`` is the profile length.
    """
    select = selector(model, units)
    groups: list[UnitGroup] = []
    joins: list[Join | None] = []
    offset = 0
    for name, param in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        chosen = select(name, param, module)
        if chosen is None:
            continue
        partition, assignment, join = chosen if len(chosen) == 3 else (*chosen, None)
        group = _make_group(name, module_name, attr, len(groups), tuple(param.shape), partition, assignment, offset)
        groups.append(group)
        joins.append(join)
        offset = group.stop
    if not groups:
        raise InputError(f"units={units!r} selects no parameter of {type(model).__name__}; "
                         f"choose another scheme ({', '.join(UNIT_SCHEMES)}) or pass a callable")
    scheme = units if isinstance(units, str) else getattr(units, "__name__", "custom")
    return UnitIndex(scheme, _joined(groups, joins) if any(joins) else tuple(groups))


def _joined(pieces: list[UnitGroup], joins: list[Join | None]) -> tuple[UnitGroup, ...]:
    """The groups of an index whose units span parameters: one per join (in the order its first part comes),
    one per parameter elsewhere, each holding its parts at their offsets among ``pieces``."""
    members: dict[object, list[UnitGroup]] = {}
    for piece, join in zip(pieces, joins):
        members.setdefault(piece.param_name if join is None else join, []).append(piece)
    groups: list[UnitGroup] = []
    offset = 0
    for key, parts in members.items():
        position = len(groups)
        if isinstance(key, Join):
            group = _compound_group(key, parts, position, offset)
        else:
            group = dataclasses.replace(parts[0], position=position, offset=offset, parts=(parts[0],))
        groups.append(group)
        offset = group.stop
    return tuple(groups)


def _compound_group(join: Join, parts: list[UnitGroup], position: int, offset: int) -> UnitGroup:
    counts = {part.param_name: part.num_units for part in parts}
    if len(set(counts.values())) != 1:
        raise InputError(f"the {join.kind} of {join.module_name or '<root>'} would join parameters with different "
                         f"numbers of units ({counts}); choose another scheme or pass a callable")
    num_units = parts[0].num_units
    return UnitGroup(param_name=".".join(filter(None, (join.module_name, join.kind))), module_name=join.module_name,
                     attr=join.kind, position=position, shape=(num_units,), partition="compound",
                     num_units=num_units, offset=offset, sizes=sum((part.sizes for part in parts[1:]), parts[0].sizes),
                     parts=tuple(parts))


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
