"""Unit scores of a run's samples against a reference set, from the stored parts (nothing is profiled again).

Two rankings (:data:`paramsal.options.RANKINGS`):

* ``"zscore"``: ``(s - mu) / sigma`` with the reference set's statistics (the paper);
* ``"pot"``: the peaks-over-threshold tail score ``-log10 p`` of :mod:`paramsal.ranking.tails`.

Reference sets (:data:`paramsal.options.REFERENCES`, or another run):

* ``"all"``: every finite sample of the run (the paper; ``stats.parquet``);
* ``"correct"``: the correctly classified ones only;
* ``"class"``: the samples of each sample's own true class; a class with fewer
  than :data:`MIN_CLASS_SAMPLES` samples is scored against all samples instead (said once);
* a run (a :class:`Run` or its path): that run's samples, e.g. a clean
  validation set for a shifted one; its units must be this run's.

The statistics of a named reference set are computed on first use and kept on
the run object; tails are read from the run where ``paramsal tails RUN``
stored them (:mod:`paramsal.rundir.tails`), else fitted in memory: reading a
score never writes the run.

Everything here works on what a run's reader gives (:class:`ScoredRun`, which
:class:`paramsal.rundir.Run` is), so the rankings import no storage code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from paramsal._typing import Rows
from paramsal.errors import InputError, ParamsalWarning, check_choice
from paramsal.options import RANKINGS, REFERENCES
from paramsal.ranking.stats import SaliencyStats
from paramsal.ranking.tails import Tails, fit_tails, join_units, stack_tails

#: A class needs this many reference samples to be its own reference set under ``reference="class"``.
MIN_CLASS_SAMPLES = 10
#: The columns of ``units.parquet`` that must agree between two runs compared with each other.
UNIT_COLUMNS = ("param", "module", "layer", "channel", "size")
#: Rows read per block while gathering reference values.
_READ_ROWS = 4096
#: Bytes per reference value while tails are fitted (the float32 values, their float64 sorted copy, the tail).
_FIT_BYTES = 24



class ScoredRun(Protocol):
    """What scoring reads of a run: :class:`paramsal.rundir.Run` (a reference run given by its path is opened by the
    scored run's own class)."""

    path: Any
    derived: dict[tuple, Any]

    @property
    def num_units(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def stats(self) -> SaliencyStats: ...
    @property
    def units(self) -> pa.Table: ...
    def table(self) -> pa.Table: ...
    def sample_ids(self, only: Rows = None) -> np.ndarray: ...
    def unit_columns(self, layers: slice | Sequence[int] | None) -> np.ndarray | None: ...
    def profiles(self, standardized: bool = True, layers: slice | Sequence[int] | None = None, only: Rows = None,
                 stats: Any = None) -> np.ndarray: ...
    def iter_profiles(self, rows: int, layers: slice | Sequence[int] | None = None, only: Rows = None,
                      standardized: bool = True, stats: Any = None,
                      columns: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def stored_tails(self, reference: str) -> Tails | None: ...


Reference = str | os.PathLike | ScoredRun


@dataclass(frozen=True)
class ReferenceSet:
    """Which stored samples a run is standardized or scored against.

    Attributes:
        name: "all", "correct", "class", or the other run's path (for messages).
        run: the run whose stored profiles make the set.
        kind: which of :attr:`run`'s samples: "all", "correct" or "class" (all, by class).
    """

    name: str
    run: ScoredRun
    kind: str

    @property
    def only(self) -> Rows:
        """The rows of :attr:`run` in the set (None: every finite sample)."""
        return "correct" if self.kind == "correct" else None

    @property
    def by_class(self) -> bool:
        return self.kind == "class"


def reference_set(run: ScoredRun, reference: Reference = "all") -> ReferenceSet:
    """The reference set ``reference`` names for ``run`` (see the module docstring).

    Raises:
        InputError: for an unknown name, or another run whose units are not this run's.
    """
    if not isinstance(reference, (str, os.PathLike)) or (str(reference) not in REFERENCES
                                                          and os.path.isdir(reference)):
        opened: Any = type(run)  # the scored run's own class opens the other one
        other = reference if not isinstance(reference, (str, os.PathLike)) else opened(reference)
        _check_same_units(run, other)
        return ReferenceSet(str(other.path), other, "all")
    name = check_reference(reference)
    return ReferenceSet(name, run, name)


def check_reference(reference: Reference) -> str:
    """``reference`` as analyses record it (a name, or a run's path); :class:`InputError` unless it names a set."""
    if not isinstance(reference, (str, os.PathLike)):
        return str(reference.path)
    if str(reference) not in REFERENCES and not os.path.isdir(reference):
        raise InputError(f"unknown reference {str(reference)!r}: expected {', '.join(REFERENCES)} or a run directory")
    return str(reference)


def scores(run: ScoredRun, method: str = "zscore", only: Rows = None, layers: slice | Sequence[int] | None = None,
           reference: Reference = "all", budget_mb: int = 256) -> np.ndarray:
    """``[n, f]`` float32 unit scores, larger = more abnormal, rows in sample-id order (as :meth:`Run.profiles`).

    Args:
        run: the run whose samples are scored.
        method: "zscore" or "pot".
        only, layers: the rows and units, as :meth:`Run.profiles` takes them.
        reference: the reference set (module docstring).
        budget_mb: memory for the reference values while tails are fitted.
    """
    check_choice("ranking", method, RANKINGS)
    ref = reference_set(run, reference)
    columns = run.unit_columns(layers)
    if method == "zscore" and not ref.by_class and ref.only is None:
        return run.profiles(layers=layers, only=only, stats=ref.run.stats)
    raw = run.profiles(standardized=False, layers=layers, only=only)
    rows = _group_rows(ref, run, run.sample_ids(only))
    if method == "pot":
        return reference_tails(ref, budget_mb).score(raw, rows, columns)
    _, mean, std = reference_moments(ref)
    if columns is not None:
        mean, std = mean[:, columns], std[:, columns]
    out = np.empty(raw.shape, np.float32)
    for group in np.unique(rows):  # a group at a time: no [n, F] float64 copy of the statistics
        here = rows == group
        out[here] = (raw[here] - mean[group]) / std[group]
    return out


def reference_moments(ref: ReferenceSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(groups [G], mean [G, F], std [G, F])`` of the reference set (:func:`reference_groups`)."""
    key = ("moments", ref.kind)
    if key not in ref.run.derived:
        groups = reference_groups(ref)
        stats = {int(g): SaliencyStats(ref.run.num_units) for g in groups}
        targets = _targets(ref.run)
        for ids, values in ref.run.iter_profiles(_READ_ROWS, only=ref.only, standardized=False):
            stats[-1].update(values)
            labels = targets[ids]
            for label in groups[1:]:
                stats[int(label)].update(values[labels == label])
        if stats[-1].count < 2:
            raise InputError(f"the reference set {ref.name!r} of {ref.run.path} has {stats[-1].count} samples; "
                             "statistics need at least 2: choose another reference")
        ref.run.derived[key] = (groups, np.stack([stats[int(g)].mean for g in groups]),
                                np.stack([stats[int(g)].std for g in groups]))
    return ref.run.derived[key]


def reference_groups(ref: ReferenceSet) -> np.ndarray:
    """``[G]`` sorted: -1 (the whole set), then, by class, each class with at least :data:`MIN_CLASS_SAMPLES`."""
    if not ref.by_class:
        return np.array([-1])
    classes, counts = np.unique(_targets(ref.run)[ref.run.sample_ids(ref.only)], return_counts=True)
    return np.concatenate([[-1], classes[counts >= MIN_CLASS_SAMPLES]]).astype(np.int64)


def reference_tails(ref: ReferenceSet, budget_mb: int = 256) -> Tails:
    """The POT tails of the reference set: stored in its run (``paramsal tails RUN``) and current, or fitted here and
    kept on the run object for this session."""
    key = ("tails", ref.kind)
    if key not in ref.run.derived:
        ref.run.derived[key] = ref.run.stored_tails(ref.kind) or fit_reference_tails(ref, budget_mb)
    return ref.run.derived[key]


def fit_reference_tails(ref: ReferenceSet, budget_mb: int = 256) -> Tails:
    """Tails of every unit of the reference set, a block of units at a time: each block reads the reference rows once.

    Args:
        budget_mb: memory for the reference values of a block of units.
    """
    run = ref.run
    if not run.complete:
        raise InputError(f"{run.path} is unfinished: POT tails are fitted on a complete run; finish profiling first")
    ids = run.sample_ids(ref.only)
    if len(ids) == 0:
        raise InputError(f"the reference set {ref.name!r} of {run.path} holds no samples: choose another reference")
    labels = _targets(run)[ids]
    groups = reference_groups(ref)
    width = max(1, (budget_mb << 20) // (_FIT_BYTES * len(ids)))
    blocks = []
    for start in range(0, run.num_units, width):
        columns = np.arange(start, min(start + width, run.num_units))
        values = np.empty((len(ids), len(columns)), np.float32)
        filled = 0
        for _, block in run.iter_profiles(_READ_ROWS, only=ref.only, standardized=False, columns=columns):
            values[filled:filled + len(block)] = block
            filled += len(block)
        blocks.append(stack_tails([fit_tails(values if g == -1 else values[labels == g]) for g in groups], groups))
    return join_units(blocks)


def _group_rows(ref: ReferenceSet, run: ScoredRun, sample_ids: np.ndarray) -> np.ndarray:
    """``[n]`` each sample's reference group, an index into :func:`reference_groups`: its class's, or the whole
    set's for a class too small (said once)."""
    groups = reference_groups(ref)
    if not ref.by_class:
        return np.zeros(len(sample_ids), np.int64)
    labels = _targets(run)[sample_ids]
    own = np.isin(labels, groups[1:])
    if not own.all():
        small = sorted(set(labels[~own].tolist()))
        warnings.warn(f"classes {small[:10]} have fewer than {MIN_CLASS_SAMPLES} samples in {ref.run.path}: "
                      "their samples are compared with all samples instead", ParamsalWarning, stacklevel=3)
    return np.where(own, np.searchsorted(groups, labels), 0)


def _targets(run: ScoredRun) -> np.ndarray:
    """Each sample's true class, indexed by sample id (-1 for ids the run lacks)."""
    key = ("targets",)
    if key not in run.derived:
        table = run.table()
        ids, targets = table.column("sample_id").to_numpy(), table.column("target").to_numpy()
        by_id = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)
        by_id[ids] = targets
        run.derived[key] = by_id
    return run.derived[key]


def _check_same_units(run: ScoredRun, other: ScoredRun) -> None:
    difference = units_difference(run, other)
    if difference:
        raise InputError(f"the reference run {other.path} has other units than {run.path} ({difference}): score "
                         "against a run of the same model and unit scheme")


def units_difference(a: ScoredRun, b: ScoredRun) -> str | None:
    """The first way two runs' units differ (A is ``a``), in words, or None when they are the same units."""
    first, second = a.units.to_pandas(), b.units.to_pandas()
    if len(first) != len(second):
        return f"A has {len(first)} units and B {len(second)}"
    for name in UNIT_COLUMNS:
        differs = np.flatnonzero(first[name].to_numpy() != second[name].to_numpy())
        if len(differs):
            row = int(differs[0])
            return (f"unit {int(first['unit_id'].iloc[row])} has {name} {_plain(first[name].iloc[row])!r} in A and "
                    f"{_plain(second[name].iloc[row])!r} in B")
    return None


def _plain(value: Any) -> Any:
    """A table's value as Python writes it (``3``, not ``np.int32(3)``)."""
    return value.item() if isinstance(value, np.generic) else value
