"""Unit scores of a run's samples against a reference set, from the stored parts (nothing is profiled again).

Two rankings (:data:`paramsal.options.RANKINGS`):

* ``"zscore"``: ``(s - mu) / sigma`` with the reference set's statistics (the paper);
* ``"pot"``: the peaks-over-threshold tail score ``-log10 p`` of :mod:`paramsal.engine.tails`.

Reference sets (:data:`paramsal.options.REFERENCES`, or another run):

* ``"all"``: every finite sample of the run (the paper; ``stats.parquet``);
* ``"correct"``: the correctly classified ones only;
* ``"class"``: the samples of each sample's own true class; a class with fewer
  than :data:`MIN_CLASS_SAMPLES` samples is scored against all samples instead (said once);
* a run (a :class:`Run` or its path): that run's samples, e.g. a clean
  validation set for a shifted one; its units must be this run's.

The statistics of a named reference set are computed on first use and kept on
the :class:`Run` object; tails are fitted once and stored in the run
(``tails/<reference>.parquet``, listed in the manifest with the checksum of
the statistics they were fitted with, so a repaired or rewritten run fits them
again).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from paramsal._io import atomic_path, file_record
from paramsal.engine.lock import RunLock, manifest_update
from paramsal.engine.manifest import STATS, TAILS_DIR, read_manifest, tails_file, write_manifest
from paramsal.engine.ownership import folder, inside
from paramsal.engine.reading import iter_vectors
from paramsal.engine.rundir import Rows, Run, open_run
from paramsal.engine.stats import SaliencyStats
from paramsal.engine.tails import Tails, fit_tails, join_units, stack_tails
from paramsal.errors import InputError, ParamsalError, ParamsalWarning, check_choice
from paramsal.options import RANKINGS, REFERENCES

#: A class needs this many reference samples to be its own reference set under ``reference="class"``.
MIN_CLASS_SAMPLES = 10
#: The version of the stored tails' layout and method; other versions are fitted again.
TAILS_FORMAT = "paramsal-tails/1"
#: The columns of ``units.parquet`` that must agree between two runs compared with each other.
UNIT_COLUMNS = ("param", "module", "layer", "channel", "size")
#: Rows read per block while gathering reference values.
_READ_ROWS = 4096
#: Bytes per reference value while tails are fitted (the float32 values, their float64 sorted copy, the tail).
_FIT_BYTES = 24

Reference = str | os.PathLike | Run


@dataclass(frozen=True)
class ReferenceSet:
    """Which stored samples a run is standardized or scored against.

    Attributes:
        name: "all", "correct", "class", or the other run's path (for messages).
        run: the run whose stored profiles make the set.
        kind: which of :attr:`run`'s samples: "all", "correct" or "class" (all, by class).
    """

    name: str
    run: Run
    kind: str

    @property
    def only(self) -> Rows:
        """The rows of :attr:`run` in the set (None: every finite sample)."""
        return "correct" if self.kind == "correct" else None

    @property
    def by_class(self) -> bool:
        return self.kind == "class"


def reference_set(run: Run, reference: Reference = "all") -> ReferenceSet:
    """The reference set ``reference`` names for ``run`` (see the module docstring).

    Raises:
        InputError: for an unknown name, or another run whose units are not this run's.
    """
    if isinstance(reference, Run) or (isinstance(reference, (str, os.PathLike)) and str(reference) not in REFERENCES
                                       and os.path.isdir(reference)):
        other = reference if isinstance(reference, Run) else open_run(reference)
        _check_same_units(run, other)
        return ReferenceSet(str(other.path), other, "all")
    name = check_reference(reference)
    return ReferenceSet(name, run, name)


def check_reference(reference: Reference) -> str:
    """``reference`` as analyses record it (a name, or a run's path); :class:`InputError` unless it names a set."""
    if isinstance(reference, Run):
        return str(reference.path)
    if str(reference) not in REFERENCES and not os.path.isdir(reference):
        raise InputError(f"unknown reference {str(reference)!r}: expected {', '.join(REFERENCES)} or a run directory")
    return str(reference)


def scores(run: Run, method: str = "zscore", only: Rows = None, layers: slice | Sequence[int] | None = None,
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
    """The POT tails of the reference set: read from its run when stored and current, else fitted and stored."""
    key = ("tails", ref.kind)
    if key not in ref.run.derived:
        tails = _stored_tails(ref.run, ref.kind)
        if tails is None:
            tails = _fit(ref, budget_mb)
            _store_tails(ref.run, ref.kind, tails)
        ref.run.derived[key] = tails
    return ref.run.derived[key]


def _fit(ref: ReferenceSet, budget_mb: int) -> Tails:
    """Tails of every unit, a block of units at a time: each block reads the reference rows once."""
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
        for _, block in iter_vectors(run, "profile", _READ_ROWS, columns, ref.only, None):
            values[filled:filled + len(block)] = block
            filled += len(block)
        blocks.append(stack_tails([fit_tails(values if g == -1 else values[labels == g]) for g in groups], groups))
    return join_units(blocks)


def _group_rows(ref: ReferenceSet, run: Run, sample_ids: np.ndarray) -> np.ndarray:
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


def _targets(run: Run) -> np.ndarray:
    """Each sample's true class, indexed by sample id (-1 for ids the run lacks)."""
    key = ("targets",)
    if key not in run.derived:
        table = run.table()
        ids, targets = table.column("sample_id").to_numpy(), table.column("target").to_numpy()
        by_id = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)
        by_id[ids] = targets
        run.derived[key] = by_id
    return run.derived[key]


def _stored_tails(run: Run, name: str) -> Tails | None:
    record = run.manifest["files"].get(tails_file(name))
    if record is None or record.get("format") != TAILS_FORMAT or STATS not in run.manifest["files"] \
            or record.get("fitted_on") != run.manifest["files"][STATS]["sha256"]:
        return None
    run.check_file(tails_file(name), record)
    return Tails.from_arrow(pq.read_table(run.path / tails_file(name)))


def _store_tails(run: Run, name: str, tails: Tails) -> None:
    """Writes the tails into the run and lists them, under the run's lock; says once if the run cannot take them."""
    try:
        with RunLock(run.path), manifest_update(run.path):
            manifest = read_manifest(run.path)
            if manifest is None or manifest["files"].get(STATS) != run.manifest["files"].get(STATS):
                raise InputError("the run changed since it was opened")
            folder(run.path, TAILS_DIR, create=True)
            with atomic_path(inside(run.path, tails_file(name))) as tmp:
                pq.write_table(tails.to_arrow(), tmp)
                record: dict[str, Any] = file_record(tmp)
            manifest["files"][tails_file(name)] = {**record, "format": TAILS_FORMAT,
                                                   "fitted_on": manifest["files"][STATS]["sha256"]}
            write_manifest(run.path, manifest)
        run.manifest = manifest
    except (OSError, ParamsalError) as exc:
        warnings.warn(f"the POT tails of {run.path} were fitted but not stored ({exc}); they are kept in memory "
                      "for this session", ParamsalWarning, stacklevel=4)


def _check_same_units(run: Run, other: Run) -> None:
    difference = units_difference(run, other)
    if difference:
        raise InputError(f"the reference run {other.path} has other units than {run.path} ({difference}): score "
                         "against a run of the same model and unit scheme")


def units_difference(a: Run, b: Run) -> str | None:
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
