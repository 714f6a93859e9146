"""Known shifts of a data set, named by data-spec suffixes: ``demo:test+noise:0.25``, ``demo:test+blur:1.0``.

A suffix ``+noise:STD`` or ``+blur:SIGMA`` after any data spec makes a copy of
that data set whose inputs are changed on read and whose labels are not, so
sample ``i`` of the copy is sample ``i`` of the original, shifted. Suffixes
chain and apply left to right (``demo:test+blur:1+noise:0.1`` blurs, then
adds noise). The spec is what a run records, so an analysis rebuilds the
shifted copy from the run like any built-in data set.

* ``noise``: Gaussian noise of standard deviation STD added to the input as
  the data set returns it (for the demo, the normalized image). The noise of
  sample ``i`` comes from a generator seeded by ``(NOISE_SEED, i)``: every
  read of a sample, in any worker process, a resumed run or an analysis that
  rebuilds the data, sees the same noise.
* ``blur``: a Gaussian blur of standard deviation SIGMA pixels over the last
  two dimensions (each channel on its own), truncated at 3 SIGMA, the border
  pixels repeated outwards. Blurring is linear with weights summing to 1 and
  the repeated border keeps a constant image constant, so blurring a
  normalized image equals normalizing the blurred image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paramsal._typing import MapDataset
from paramsal.errors import InputError

#: Mixed into every sample's noise seed, so the noise is not the generator's stream of a bare sample index.
NOISE_SEED = 0x5EED_0F_A11


def add_noise(inputs: torch.Tensor, std: float, index: int) -> torch.Tensor:
    """``inputs + std * N(0, 1)``, the noise drawn from a generator seeded by the sample's index.

    Args:
        inputs: one sample's floating-point input, any shape (e.g. ``[C, H, W]``).
        std: the noise's standard deviation, in the input's own units.
        index: the sample's position in the data set: same index, same noise.
    """
    noise = np.random.default_rng([NOISE_SEED, int(index)]).standard_normal(tuple(inputs.shape))
    return inputs + torch.from_numpy(std * noise).to(inputs.dtype)


def gaussian_blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each ``[H, W]`` plane of ``inputs [..., H, W]`` blurred by a Gaussian of ``sigma`` pixels (see the module
    docstring: truncated at 3 sigma, border repeated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(inputs.dtype)
    height, width = inputs.shape[-2:]
    planes = inputs.reshape(-1, 1, height, width)
    planes = F.pad(planes, (radius, radius, radius, radius), mode="replicate")
    # Separable: a row pass, then a column pass, over every plane as a batch of one-channel images.
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
    return planes.reshape(inputs.shape)


@dataclass(frozen=True)
class Shift:
    """One shift of a data spec: ``kind`` ("noise" or "blur") and its ``amount`` (the std, or sigma)."""

    kind: str
    amount: float

    def __call__(self, inputs: torch.Tensor, index: int) -> torch.Tensor:
        """Sample ``index``'s input, shifted."""
        if self.kind == "noise":
            return add_noise(inputs, self.amount, index)
        if inputs.ndim < 2:
            raise InputError(f"+blur:{self.amount:g} blurs images [..., H, W]; this data set's inputs have "
                             f"shape {tuple(inputs.shape)}")
        return gaussian_blur(inputs, self.amount)

    def __str__(self) -> str:
        return f"+{self.kind}:{self.amount:g}"


#: Each shift's name -> what its amount is, as messages say it.
SHIFTS: dict[str, str] = {"noise": "the standard deviation of the noise added to each input",
                          "blur": "the standard deviation of the Gaussian blur, in pixels"}


def split_shifts(spec: str) -> tuple[str, tuple[Shift, ...]]:
    """A data spec's base and its trailing shifts: ``"demo:test+noise:0.25"`` -> ``("demo:test", (noise 0.25,))``.

    Only ``+NAME:AMOUNT`` endings whose NAME is a known shift are taken off,
    so a spec with another ``+`` (a folder named ``a+b``) keeps it.

    Raises:
        InputError: for a known shift whose amount is not a positive number.
    """
    base, shifts = spec, list[Shift]()
    while True:
        head, plus, tail = base.rpartition("+")
        kind, colon, amount = tail.partition(":")
        if not (plus and head and colon and kind in SHIFTS):
            return base, tuple(reversed(shifts))
        shifts.append(Shift(kind, _positive_amount(spec, kind, amount)))
        base = head


def _positive_amount(spec: str, kind: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"data spec {spec!r}: +{kind} takes a positive number ({SHIFTS[kind]}), got {text!r}; "
                         f"e.g. +{kind}:0.5")
    return value


class ShiftedDataset:
    """A data set whose inputs are shifted on read; labels, length and sample order are the base set's.

    Args:
        base: a map-style data set of ``(input, class)`` with floating-point
            tensor inputs (e.g. ``[C, H, W]`` images).
        shifts: applied in order to every input.
    """

    def __init__(self, base: MapDataset, shifts: tuple[Shift, ...]):
        self.base = base
        self.shifts = shifts

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        inputs, label = self.base[index]
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise InputError(f"a shift ({''.join(map(str, self.shifts))}) needs floating-point tensor inputs; "
                             f"sample {index} of {type(self.base).__name__} is {type(inputs).__name__}")
        for shift in self.shifts:
            inputs = shift(inputs, index)
        return inputs, label

    def __repr__(self) -> str:
        return f"ShiftedDataset({self.base!r}{''.join(map(str, self.shifts))})"

    # Labels and class names are the base set's: fingerprints and galleries read them without decoding inputs.
    @property
    def targets(self) -> Any:
        return getattr(self.base, "targets", None)

    @property
    def labels(self) -> Any:
        return getattr(self.base, "labels", None)

    @property
    def classes(self) -> Any:
        return getattr(self.base, "classes", None)


def shifted(load: Callable[[str], MapDataset], spec: str) -> MapDataset | None:
    """The data set of a spec with shifts, loaded by ``load`` from its base spec; None when it names none."""
    base, shifts = split_shifts(spec)
    if not shifts:
        return None
    return ShiftedDataset(load(base), shifts)
