"""Which reducer serves which unit parameters of a model: the hooks backend's plan, made before a forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from paramsal.engine.units import UnitGroup, UnitIndex
from paramsal.errors import UnsupportedModuleError
from paramsal.kernels.registry import ReducerEntry, find_reducer, op_served


@dataclass(frozen=True)
class Layer:
    """A module with unit parameters, the entry that serves them (its own call, or the op rules) and their units."""

    module: nn.Module
    entry: ReducerEntry
    groups: tuple[UnitGroup, ...]


def hook_plan(model: nn.Module, index: UnitIndex) -> dict[str, Layer]:
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
        if entry is None or any(g.attr not in entry.params for g in groups):
            entry = op_served(module)  # the forward pass proves or refuses each use
        plan[name] = Layer(module, entry, tuple(groups))
    return plan


def hooks_refusal(model: nn.Module, index: UnitIndex) -> str | None:
    """Why the hooks backend cannot profile ``model`` at all, or None (a forward pass may still show a use no
    reducer serves)."""
    try:
        hook_plan(model, index)
    except UnsupportedModuleError as exc:
        return str(exc)
    return None
