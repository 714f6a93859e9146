"""Streaming mean and standard deviation of profiles, mergeable across batches, shards and ranks.

Sufficient statistics ``(count, mean, m2)`` in float64, with ``m2`` the sum of
squared deviations from the mean. A batch contributes its own two-pass
moments and is folded in with Chan et al.'s parallel formula, so any chunking
or merge order gives the one-pass result to float64 rounding; the textbook
``E[x^2] - E[x]^2`` would lose every digit when the mean dwarfs the spread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._io import atomic_path, load_tensor_file
from paramsal.errors import InputError, first_line

#: Standard deviations at or below this are replaced by 1, as the reference code does.
STD_FLOOR = 1e-14

Moments = tuple[int, np.ndarray, np.ndarray]

if TYPE_CHECKING:
    from torch import Tensor


def batch_moments(values: np.ndarray) -> Moments:
    """Two-pass moments of ``[N, F]`` float64 values: ``(N, mean [F], m2 [F])``."""
    mean = values.mean(axis=0)
    return len(values), mean, np.square(values - mean).sum(axis=0)


#: Rows of a batch converted to float64 at a time by :func:`finite_moments`: a few MB of temporaries, small enough to
#: come back from the heap (a fresh allocation of tens of MB is mapped anew, and its page faults cost more than the
#: arithmetic).
_ROWS = 32


def finite_moments(profiles: np.ndarray, keep: np.ndarray) -> Moments:
    """Two-pass float64 moments ``(count, mean [F], m2 [F])`` of the rows ``keep [N]`` selects of ``profiles [N, F]``
    (float32 or float64), a few rows at a time: numpy accumulates float32 values in float64 without a float64 copy
    of the batch, at twice torch's rate on a CPU."""
    kept = profiles if keep.all() else profiles[keep]
    mean = np.add.reduce(kept, axis=0, dtype=np.float64) / max(1, len(kept))
    m2 = np.zeros(kept.shape[1])
    for start in range(0, len(kept), _ROWS):
        block = kept[start:start + _ROWS].astype(np.float64)
        block -= mean
        m2 += np.square(block, out=block).sum(0)
    return len(kept), mean, m2


def chan_merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan, Golub & LeVeque)."""
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    if na == 0:
        return nb, mean_b.copy(), m2_b.copy()
    if nb == 0:
        return na, mean_a.copy(), m2_a.copy()
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + np.square(delta) * (na * nb / n)


@dataclass
class SaliencyStats:
    """Per-unit count, mean and m2 of raw profiles (float64).

    Args:
        num_units: F, the profile length.
        aggregation: the aggregation of the profiles these statistics describe,
            when known ("mean_abs" or "abs_mean"); informative only.
    """

    num_units: int
    aggregation: str | None = None
    count: int = 0
    mean: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]  # made zeros in __post_init__
    m2: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if isinstance(self.num_units, bool) or not isinstance(self.num_units, (int, np.integer)) \
                or self.num_units < 0:
            raise InputError(f"num_units must be a non-negative integer (the profile length), "
                             f"got {self.num_units!r}")
        self.num_units = int(self.num_units)
        self.mean = np.zeros(self.num_units) if self.mean is None else np.array(self.mean, np.float64)
        self.m2 = np.zeros(self.num_units) if self.m2 is None else np.array(self.m2, np.float64)
        if self.mean.shape != (self.num_units,) or self.m2.shape != (self.num_units,):
            raise InputError(f"mean {self.mean.shape} and m2 {self.m2.shape} must both have shape "
                             f"({self.num_units},)")

    def update(self, profiles: Tensor | np.ndarray) -> SaliencyStats:
        """Folds in a batch ``[N, F]`` (torch or numpy); returns self.

        Raises:
            InputError: for a batch of another width, or one holding NaN or
                inf (one such value would make every later mean and std of its
                unit NaN); the statistics are left unchanged.
        """
        values = _as_float64(profiles)
        if values.ndim != 2 or values.shape[1] != self.num_units:
            raise InputError(f"profiles of shape {values.shape} do not fit statistics of {self.num_units} units")
        _check_finite(values)
        if len(values):
            self.count, self.mean, self.m2 = chan_merge(self._moments, batch_moments(values))
        return self

    def merge(self, other: SaliencyStats) -> SaliencyStats:
        """Statistics of both sets together (disjoint samples); neither operand changes."""
        if other.num_units != self.num_units:
            raise InputError(f"cannot merge statistics of {self.num_units} and {other.num_units} units")
        count, mean, m2 = chan_merge(self._moments, other._moments)
        return SaliencyStats(self.num_units, self.aggregation or other.aggregation, count, mean, m2)

    @property
    def _moments(self) -> Moments:
        return self.count, self.mean, self.m2

    @property
    def variance(self) -> np.ndarray:
        """Unbiased (n-1) variance ``[F]``."""
        if self.count < 2:
            raise InputError(f"a standard deviation needs at least 2 samples, these statistics have {self.count}")
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        """Unbiased standard deviation ``[F]``, entries ``<= 1e-14`` replaced by 1 (as the reference)."""
        std = np.sqrt(self.variance)
        return np.where(std <= STD_FLOOR, 1.0, std)

    def standardize(self, profiles: Tensor | np.ndarray) -> Tensor:
        """``(s - mean) / std`` of raw profiles ``[..., F]``.

        Returns a torch tensor on the profiles' device, in their floating
        dtype (float32 for numpy input that is not float64); differentiable
        when the profiles are.
        """
        import torch  # only here: the statistics themselves are numpy, and the run directory reads them without torch

        profiles = torch.as_tensor(profiles)
        if profiles.shape[-1] != self.num_units:
            raise InputError(f"profiles of shape {tuple(profiles.shape)} do not fit statistics of "
                             f"{self.num_units} units")
        dtype = profiles.dtype if profiles.is_floating_point() else torch.float32
        mean = torch.as_tensor(self.mean, dtype=dtype, device=profiles.device)
        std = torch.as_tensor(self.std, dtype=dtype, device=profiles.device)
        return (profiles.to(dtype) - mean) / std

    def to_arrow(self) -> pa.Table:
        """One row per unit: unit_id, count, mean, m2, std (float64)."""
        std = self.std if self.count >= 2 else np.full(self.num_units, np.nan)
        table = pa.table({"unit_id": np.arange(self.num_units, dtype=np.int64),
                          "count": np.full(self.num_units, self.count, dtype=np.int64),
                          "mean": self.mean, "m2": self.m2, "std": std})
        return table.replace_schema_metadata({"paramsal.aggregation": self.aggregation or ""})

    def save(self, path: str | os.PathLike) -> None:
        """Writes a Parquet file (atomically): plain numbers, no pickled objects."""
        with atomic_path(path) as tmp:
            pq.write_table(self.to_arrow(), tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SaliencyStats:
        """Reads statistics written by :meth:`save`.

        Raises:
            InputError: naming the file when it is missing, is not Parquet or
                lacks the count, mean and m2 columns.
        """
        if not Path(path).is_file():
            raise InputError(f"no statistics file at {path}")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path} is not a statistics file paramsal can read ({first_line(exc)}); "
                             "give the stats.parquet of a run, or a file written by SaliencyStats.save") from exc
        missing = {"count", "mean", "m2"} - set(table.column_names)
        if missing:
            raise InputError(f"{path} is not a statistics file: columns {sorted(missing)} are missing")
        counts = table.column("count").to_numpy()
        meta = table.schema.metadata or {}
        aggregation = meta.get(b"paramsal.aggregation", b"").decode() or None
        return cls(table.num_rows, aggregation, int(counts[0]) if len(counts) else 0,
                   table.column("mean").to_numpy(), table.column("m2").to_numpy())


#: The authors' released statistics: 50,000 ImageNet validation images each.
REFERENCE_MODELS = ("resnet50", "vgg19", "densenet121", "inception_v3")
_REFERENCE_COUNT = 50_000


def load_reference_stats(path_or_name: str | os.PathLike) -> SaliencyStats:
    """Loads the authors' released ImageNet statistics (``{'mean', 'std'}`` files).

    Args:
        path_or_name: a model name ("resnet50", "vgg19", "densenet121",
            "inception_v3"; shipped with paramsal) or the path of such a file.

    Returns:
        Statistics with ``count`` 50,000 and ``m2`` rebuilt from the released
        standard deviation. Their ``aggregation`` is "abs_mean": the files were
        saved before the reference code moved to the paper's mean_abs, so
        standardize profiles computed with ``aggregation="abs_mean"``.
    """
    path = Path(path_or_name)
    if str(path_or_name) in REFERENCE_MODELS:
        name = f"ImageNet_val_saliency_stat_{path_or_name}_filter_wise.pth"
        path = Path(str(resources.files("paramsal.data") / "authors_imagenet_stats" / name))
    if not path.is_file():
        raise InputError(f"no reference statistics at {path}; known names: {', '.join(REFERENCE_MODELS)}")
    content = load_tensor_file(path, "a statistics file")
    if not isinstance(content, dict) or not {"mean", "std"} <= set(content):
        raise InputError(f"{path} is not a {{'mean', 'std'}} statistics file")
    mean = content["mean"].double().numpy()
    std = content["std"].double().numpy()
    return SaliencyStats(len(mean), "abs_mean", _REFERENCE_COUNT, mean, np.square(std) * (_REFERENCE_COUNT - 1))


def _check_finite(values: np.ndarray) -> None:
    """Refuses ``[N, F]`` values holding NaN or inf, naming the first (row, unit)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, unit = np.argwhere(bad)[0]
        raise InputError(f"profiles contain a non-finite value at row {row}, unit {unit} ({values[row, unit]}); "
                         f"{int(bad.any(axis=1).sum())} of {len(values)} rows are affected: leave those samples "
                         "out (their loss or gradient overflowed) before updating the statistics")


def _as_float64(profiles: Tensor | np.ndarray) -> np.ndarray:
    if hasattr(profiles, "detach"):  # a torch tensor, told apart without importing torch
        return profiles.detach().cpu().double().numpy()
    return np.asarray(profiles, dtype=np.float64)
