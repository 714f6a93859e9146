"""Gaussian noise on the weights of chosen units, drawn once per (sample, unit): perturbation (paper A.5).

:func:`gaussian_deltas` gives :meth:`UnitEditor.perturbed
<paramsal.analyses.unit_editing.UnitEditor.perturbed>` its per-sample weight
deltas. The noise of a unit is a function of the sample's seed and the unit
alone (a counter-based generator, :func:`unit_noise`), so that every
selection and every k that perturbs a unit of a sample adds the same noise
to it, in whatever batch and order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from paramsal.analyses.unit_editing import WeightDeltas
from paramsal.engine.units import UnitIndex
from paramsal.errors import InputError

__all__ = ["gaussian_deltas", "unit_noise"]


def gaussian_deltas(index: UnitIndex, unit_ids: Sequence[Sequence[int]] | np.ndarray, std: float,
                    seeds: Sequence[int], dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> list[WeightDeltas]:
    """Gaussian noise ``N(0, std**2)`` on the chosen output channels of each sample.

    The noise sample n adds to unit u is a function of ``(seeds[n], u)``
    alone (see :func:`unit_noise`): the same whatever other units are chosen
    with it, in whatever order, in whatever batch, and whatever ``dtype``
    (the draws are float32 numbers). So perturbing the top-5 units and then
    the top-10 adds the same noise to the five they share.

    Args:
        index: the units; each must be a whole output channel ("rows").
        unit_ids: per sample, the units to perturb.
        std: standard deviation of the noise.
        seeds: one seed per sample (integers in ``[0, 2**64)``).
        dtype, device: of the deltas (those of the model's weights).

    Returns:
        One :class:`WeightDeltas` per parameter that has any chosen unit,
        each sample's units in increasing order.
    """
    if len(seeds) != len(unit_ids):
        raise InputError(f"{len(seeds)} seeds for {len(unit_ids)} samples")
    group_of = np.repeat(np.arange(len(index.groups)), [g.num_units for g in index.groups])
    unit_size = np.repeat([int(np.prod(g.shape[1:])) for g in index.groups], [g.num_units for g in index.groups])
    offsets = np.array([g.offset for g in index.groups])
    collected: dict[int, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for row, (ids, seed) in enumerate(zip(unit_ids, seeds)):
        ids = np.sort(np.asarray(ids, dtype=np.int64).reshape(-1))
        if not len(ids):
            continue
        if ids.min() < 0 or ids.max() >= len(index):
            raise InputError(f"unit ids of sample {row} out of range [0, {len(index)})")
        sizes = unit_size[ids]
        noise = torch.from_numpy((unit_noise(int(seed), ids, sizes) * std).astype(np.float32))
        for group, unit, piece in zip(group_of[ids].tolist(), (ids - offsets[group_of[ids]]).tolist(),
                                      noise.split(sizes.tolist())):
            samples, channels, values = collected.setdefault(group, ([], [], []))
            samples.append(row)
            channels.append(unit)
            values.append(piece)
    return [WeightDeltas(param=index.groups[group].param_name,
                         samples=torch.tensor(s, dtype=torch.long, device=device),
                         channels=torch.tensor(c, dtype=torch.long, device=device),
                         values=torch.cat(v).view(len(v), *index.groups[group].shape[1:]).to(device, dtype))
            for group, (s, c, v) in sorted(collected.items())]


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (the golden ratio)
_GAMMA2 = np.uint64((2 * 0x9E3779B97F4A7C15) % (1 << 64))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on an array of uint64 (arithmetic modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def unit_noise(seed: int, units: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Standard normal numbers keyed by ``(seed, unit)``: ``sizes[i]`` of them for ``units[i]``, concatenated.

    A counter-based generator: element j of unit u is computed from
    ``(seed, u, j)`` alone (SplitMix64 hashes of the counter, then
    Box-Muller), so any subset of units, in any order, gets the same numbers
    for each unit, without drawing those of the other units.

    Args:
        seed: an integer in ``[0, 2**64)``.
        units: ``[m]`` unit ids (>= 0).
        sizes: ``[m]`` how many numbers each needs (the unit's weight elements).

    Returns:
        ``[sum(sizes)]`` float64.
    """
    units = np.asarray(units, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= int(seed) < 1 << 64:
        raise InputError(f"noise seed {seed} is outside [0, 2**64)")
    base = _mix(np.array([int(seed)], dtype=np.uint64))
    keys = _mix(base ^ _mix((units.astype(np.uint64) + np.uint64(1)) * _GAMMA))
    starts = np.cumsum(sizes) - sizes
    element = (np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)).astype(np.uint64)
    counter = np.repeat(keys, sizes) + element * _GAMMA2
    first, second = _mix(counter + _GAMMA), _mix(counter + _GAMMA2)
    # 53 random bits each: u1 in (0, 1], so that log(u1) is finite.
    u1 = ((first >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53
    u2 = (second >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
