"""Reading a run directory's data files (:class:`Run`); the layout and manifest are in
:mod:`paramsal.rundir.manifest`, the writing in :mod:`paramsal.rundir.writing`.

Every file a reader opens is checked against the manifest first (size,
sha256, and for parts the row count and sample ids), so a damaged, swapped or
truncated file is an error naming it, never a wrong number. Reading is pure
data: nothing named in a run directory is imported or called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._arrow import list_values
from paramsal._typing import Rows
from paramsal.errors import InputError
from paramsal.options import ROW_SELECTIONS
from paramsal.ranking.scoring import scores
from paramsal.ranking.stats import SaliencyStats
from paramsal.ranking.tails import Tails
from paramsal.rundir.integrity import check_file, check_no_strays, check_part_rows, check_schema, sample_columns
from paramsal.rundir.layout import STATS, TAILS_DIR, TAILS_FORMAT, UNITS, tails_file
from paramsal.rundir.manifest import FileRecord, Part, read_manifest
from paramsal.rundir.ownership import MANIFEST, inside
from paramsal.rundir.reading import Block, iter_vectors


class Run:
    """A run directory opened for reading (see :func:`open_run`).

    Raises:
        RunCorruptError: on opening, for a damaged manifest or files it does
            not list; on reading, for a file that is not the one it lists.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise InputError(f"{self.path} is not a paramsal run directory (no {MANIFEST})")
        check_no_strays(self.path, manifest)
        self.manifest = manifest
        self.parts = manifest.listed
        self._checked: set[tuple[str, int, int] | None] = set()
        #: What readers derive from the stored files once per open run (reference statistics, tails).
        self.derived: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, samples={self.num_samples}, units={self.num_units})"

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def identity(self) -> str:
        """What tells this run from any other, even one made again in this folder (results record it)."""
        return self.manifest.identity

    @property
    def num_units(self) -> int:
        return self.manifest.num_units

    @property
    def num_samples(self) -> int:
        """Samples written so far (all of the data set once the run is complete)."""
        return sum(p.rows for p in self.parts)

    @property
    def units(self) -> pa.Table:
        """One row per unit: unit_id, param, module, layer, channel, size."""
        self.check_file(UNITS, self.manifest.files[UNITS])
        return pq.read_table(self.path / UNITS)

    @property
    def stats(self) -> SaliencyStats:
        """Statistics over every finite sample written (merged from the parts while the run is unfinished)."""
        if self.complete:
            self.check_file(STATS, self.manifest.files[STATS])
            return SaliencyStats.load(self.path / STATS)
        return self.merged_part_stats()

    def merged_part_stats(self) -> SaliencyStats:
        """The Chan merge of the parts' own moments, in part order."""
        total = SaliencyStats(self.num_units)
        for part in self.parts:
            self._check_part(part)
            total = total.merge(SaliencyStats.load(self.path / part.stats_file))
        return total

    def read_part(self, part: Part, columns: Sequence[str]) -> pa.Table:
        """A part's columns (``sample_id`` always among them), after checking the file is the one listed."""
        self._check_part(part)
        table = pq.read_table(self.path / part.file, columns=list(dict.fromkeys(["sample_id", *columns])))
        check_part_rows(self.path, part, table, self.manifest)
        return table

    def iter_parts(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """The parts' checked columns, one part at a time, in sample order."""
        for part in self.parts:
            yield self.read_part(part, columns)

    def table(self) -> pa.Table:
        """The per-sample columns (sample_id, target, pred, loss, ..., nonfinite; an answer run's answer, reference,
        answer_logprob, label), without profiles or features."""
        columns = sample_columns(self.manifest)
        tables = list(self.iter_parts(list(columns)))
        if tables:
            return pa.concat_tables(tables)
        return pa.schema(columns).empty_table()  # no part finished yet: the columns, typed, with no rows

    @property
    def task(self) -> str:
        """What the profiled model was trained for (:data:`~paramsal.options.TASKS`): "answer" for a chat LLM's
        answers, whose sample table has the answer columns."""
        return self.manifest.config.task

    @property
    def accuracy(self) -> float:
        """Share of correctly classified samples among the finite ones."""
        table = self.table()
        correct = table.column("correct").to_numpy(zero_copy_only=False)[self.selected(table, None)]
        return float(correct.mean()) if len(correct) else float("nan")

    def nonfinite_ids(self) -> np.ndarray:
        """Ids of the samples skipped for a non-finite loss or gradient (flagged rows)."""
        return self.sample_ids("nonfinite")

    def sample_ids(self, only: Rows = None) -> np.ndarray:
        """Sample ids in row order, restricted like :meth:`profiles`."""
        table = self.table()
        ids = table.column("sample_id").to_numpy()
        return ids[self.selected(table, only)]

    def profiles(self, standardized: bool = True, layers: slice | Sequence[int] | None = None,
                 only: Rows = None, stats: SaliencyStats | Run | None = None) -> np.ndarray:
        """Profiles ``[n, f]`` (float32), reading one part at a time.

        Args:
            standardized: ``(s - mean) / std`` with this run's statistics (or ``stats``).
            layers: keep the units of these layer indices (a slice or a list of
                ``units.layer`` values), e.g. ``slice(0, 10)`` for shallow layers.
            only: "misclassified", "correct", "nonfinite" or sample ids;
                default every sample with finite numbers (flagged samples are
                left out of every named selection but "nonfinite").
            stats: statistics of another run (e.g. a reference set) to standardize with.

        Returns:
            Rows in sample-id order, columns in unit order.
        """
        return self._vectors("profile", self.unit_columns(layers), only,
                             self._standardizer(stats) if standardized else None)

    def scores(self, method: str = "zscore", only: Rows = None, layers: slice | Sequence[int] | None = None,
               reference: str | os.PathLike | Run = "all") -> np.ndarray:
        """Unit scores ``[n, f]`` (float32), larger = more abnormal, rows and columns as :meth:`profiles` gives them.

        Args:
            method: "zscore" (the paper) or "pot" (peaks-over-threshold tail score, ``-log10`` of the tail
                probability; the tails ``paramsal tails RUN`` stored, else fitted in memory: reading a score never
                writes the run; :mod:`paramsal.ranking.tails`).
            reference: the samples scored against: "all", "correct", "class" (each
                sample's own class) or another run (:mod:`paramsal.ranking.scoring`).
        """
        return scores(self, method, only, layers, reference)

    def stored_tails(self, reference: str) -> Tails | None:
        """The POT tails of a named reference set that ``paramsal tails`` stored in the run
        (:mod:`paramsal.rundir.tails`), fitted on its current statistics; else None.

        Raises:
            RunCorruptError: the listed file is not the one the manifest lists.
        """
        record, stats = self.manifest.files.get(tails_file(reference)), self.manifest.files.get(STATS)
        if record is None or stats is None or record.format != TAILS_FORMAT or record.fitted_on != stats.sha256:
            return None
        self.check_file(tails_file(reference), record)
        return Tails.from_arrow(pq.read_table(self.path / tails_file(reference)))

    def features(self, only: Rows = None) -> np.ndarray:
        """Penultimate features ``[n, D]`` (float32), if the run recorded them."""
        self._check_features()
        return self._vectors("features", None, only, None)

    def iter_profiles(self, rows: int, layers: slice | Sequence[int] | None = None, only: Rows = None,
                      standardized: bool = True, stats: SaliencyStats | Run | None = None,
                      columns: np.ndarray | None = None) -> Iterator[Block]:
        """The profiles of :meth:`profiles` (same arguments) in blocks: memory set by ``rows``, not by a part.

        Each part is checked against the manifest as it is reached; its profile
        column is decoded a batch at a time (:mod:`paramsal.rundir.reading`).

        Args:
            rows: most rows per block.
            columns: ``[f]`` unit columns to keep, instead of ``layers`` (a block of units, say).

        Yields:
            ``(sample_ids [m] int64, profiles [m, f] float32)``, ``1 <= m <= rows``
            (read-only arrays), in sample-id order: concatenated, the blocks are
            :meth:`profiles` with the same arguments.
        """
        return iter_vectors(self, "profile", rows, self.unit_columns(layers) if columns is None else columns, only,
                            self._standardizer(stats) if standardized else None)

    def iter_features(self, rows: int, only: Rows = None) -> Iterator[Block]:
        """The features of :meth:`features` in blocks of at most ``rows`` rows, as :meth:`iter_profiles` yields them."""
        self._check_features()
        return iter_vectors(self, "features", rows, None, only, None)

    def _check_features(self) -> None:
        if not self.manifest.features:
            raise InputError(f"{self.path} has no features: profile with features=True")

    def summary(self) -> str:
        table = self.table()
        finite = self.selected(table, None)
        correct = table.column("correct").to_numpy(zero_copy_only=False)[finite]
        units = self.units
        layers = len(set(units.column("layer").to_pylist()))
        status = "complete" if self.complete else f"unfinished ({self.num_samples} of {self.manifest.num_samples})"
        lines = [
            f"run        {self.path} ({status})",
            f"model      {self.manifest.config.model}",
            f"data       {self.manifest.config.data}",
            f"samples    {table.num_rows}",
            f"accuracy   {correct.mean():.4f} ({int((~correct).sum())} misclassified)" if len(correct) else
            "accuracy   -",
            f"units      {self.num_units} ({self.manifest.config.units}, "
            f"{self.manifest.aggregation}) in {layers} layers",
        ]
        skipped = table.column("sample_id").to_numpy()[~finite]
        if len(skipped):
            lines.append(f"skipped    {len(skipped)} with a non-finite loss or gradient (ids "
                         f"{', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''})")
        return "\n".join(lines)

    def check_file(self, name: str, record: FileRecord) -> None:
        """Checks a file (size, sha256, and a table's schema) once per reader, again only if it changed on disk."""
        path = inside(self.path, name)
        if _state(name, path) not in self._checked:
            check_file(self.path, name, record, self.manifest)  # raises for a missing file, or a link
            if not name.startswith(f"{TAILS_DIR}/"):
                check_schema(self.path, name, self.manifest)
            self._checked.add(_state(name, path))  # the file exists: checked above

    def _check_part(self, part: Part) -> None:
        for name, record in part.records.items():
            self.check_file(name, record)

    def unit_columns(self, layers: slice | Sequence[int] | None) -> np.ndarray | None:
        """Profile columns ``[f]`` of the units in ``layers`` (see :meth:`profiles`), or None for all units."""
        if layers is None:
            return None
        layer_of_unit = self.units.column("layer").to_numpy()
        known = np.unique(layer_of_unit)
        if isinstance(layers, slice):
            chosen = known[layers]
        else:
            chosen = np.asarray(layers)
            unknown = np.setdiff1d(chosen, known)
            if len(unknown):
                raise InputError(f"layers {unknown.tolist()} are not in the run {self.path} (its layers are "
                                 f"{known.min()}..{known.max()})")
        if not len(chosen):
            raise InputError(f"layers={layers!r} selects no units of {self.path} (its layers are "
                             f"{known.min()}..{known.max()})")
        return np.flatnonzero(np.isin(layer_of_unit, chosen))

    def _standardizer(self, stats: SaliencyStats | Run | None):
        stats = self.stats if stats is None else stats.stats if isinstance(stats, Run) else stats
        if stats.num_units != self.num_units:
            raise InputError(f"statistics of {stats.num_units} units cannot standardize a run of "
                             f"{self.num_units} units")
        return stats.mean, stats.std

    def selected(self, table: pa.Table, only: Rows) -> np.ndarray:
        """``[rows]`` which rows of ``table`` (from :meth:`table` or :meth:`read_part`) a selection ``only`` keeps."""
        flagged = table.column("nonfinite").to_numpy(zero_copy_only=False)
        if only is None:
            return ~flagged
        if isinstance(only, str):
            if only == "nonfinite":
                return flagged
            correct = table.column("correct").to_numpy(zero_copy_only=False)
            if only == "misclassified":
                return ~correct & ~flagged
            if only == "correct":
                return correct & ~flagged
            raise InputError(f"only={only!r}: expected one of {', '.join(ROW_SELECTIONS)} or sample ids")
        return np.isin(table.column("sample_id").to_numpy(), np.asarray(only))

    def _vectors(self, column: str, unit_columns: np.ndarray | None, only: Rows, standardizer) -> np.ndarray:
        blocks = []
        for table in self.iter_parts(["correct", "nonfinite", column]):
            mask = self.selected(table, only)
            values = list_values(table.column(column))[mask]
            if unit_columns is not None:
                values = values[:, unit_columns]
            if standardizer is not None:
                mean, std = standardizer
                if unit_columns is not None:
                    mean, std = mean[unit_columns], std[unit_columns]
                values = ((values - mean) / std).astype(np.float32)
            blocks.append(values)
        width = len(unit_columns) if unit_columns is not None else (self.num_units if column == "profile" else 0)
        return np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)


def _state(name: str, path: Path) -> tuple[str, int, int] | None:
    """A file's name, size and modification time (not through a link), or None when it is not there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return name, info.st_size, info.st_mtime_ns


def open_run(path: str | os.PathLike) -> Run:
    """Opens a run directory written by :func:`paramsal.profile_dataset` for reading."""
    return Run(path)
