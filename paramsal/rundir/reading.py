"""Streaming reads of a run's vectors (profiles, features) in blocks of rows: memory set by the block, not by a part.

:func:`iter_vectors` (behind :meth:`Run.iter_profiles <paramsal.rundir.run.Run.iter_profiles>` and
:meth:`Run.iter_features <paramsal.rundir.run.Run.iter_features>`) checks each part it reads
against the manifest like every read (size and sha256, then the ``sample_id``
column read alone, with the small columns a selection needs), then decodes the
vector column alone in batches (:meth:`pyarrow.parquet.ParquetFile.iter_batches`),
buffered, so that a part is never held whole: parts are written in row groups
of :data:`ROW_GROUP_ROWS` rows, and a part written in one row group (before
that) is read the same way, a buffer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._arrow import list_values
from paramsal._typing import Rows
from paramsal.errors import check_integer
from paramsal.rundir.manifest import Part


class PartReader(Protocol):
    """What :func:`iter_vectors` reads of a run: :class:`paramsal.rundir.run.Run`."""

    path: Path
    parts: list[Part]

    def read_part(self, part: Part, columns: Sequence[str]) -> pa.Table: ...
    def selected(self, table: pa.Table, only: Rows) -> np.ndarray: ...


#: Rows per row group of a part file: a reader decodes at most this many profiles at once, whatever the part's size.
ROW_GROUP_ROWS = 256
#: Bytes read at a time from a column chunk (pyarrow's ``buffer_size``), instead of the whole chunk.
READ_BUFFER = 1 << 20
#: Bytes of vectors decoded per batch (at least one row; at most a block): small next to a block, large next to a
#: batch's fixed cost.
BATCH_BYTES = 8 << 20

Block = tuple[np.ndarray, np.ndarray]


def iter_vectors(run: PartReader, column: str, rows: int, unit_columns: np.ndarray | None, only: Rows,
                 standardizer: tuple[np.ndarray, np.ndarray] | None) -> Iterator[Block]:
    """The ``column`` vectors of the samples ``only`` selects, in blocks of ``rows`` rows, in sample-id order.

    Args:
        run: the run to read.
        column: "profile" or "features".
        rows: most rows per block (every block but the last has exactly ``rows``).
        unit_columns: ``[f]`` columns to keep (:meth:`Run.unit_columns`), or None for all.
        only: a selection as :meth:`Run.profiles` takes it; parts holding none of
            the given sample ids are not read.
        standardizer: ``(mean [F], std [F])`` to apply as :meth:`Run.profiles` does, or None.

    Yields:
        ``(sample_ids [m] int64, vectors [m, f] float32)``, ``1 <= m <= rows``
        (read-only). Memory: one block, plus one batch being decoded (8 MB,
        or a row, or the block if smaller) and its standardization (in float64).

    Raises:
        InputError: at once, for a ``rows`` that is not a positive integer.
    """
    rows = check_integer("rows", rows)
    if standardizer is not None and unit_columns is not None:
        standardizer = standardizer[0][unit_columns], standardizer[1][unit_columns]
    return _iter_vectors(run, column, rows, unit_columns, only, standardizer)


def _iter_vectors(run: PartReader, column: str, rows: int, unit_columns: np.ndarray | None, only: Rows,
                  standardizer: tuple[np.ndarray, np.ndarray] | None) -> Iterator[Block]:
    wanted = None if only is None or isinstance(only, str) else np.unique(np.asarray(only))
    blocks = _Blocks(rows)
    for part in run.parts:
        if wanted is not None and np.searchsorted(wanted, part.start) == np.searchsorted(wanted, part.stop):
            continue
        keep = run.selected(run.read_part(part, ["correct", "nonfinite"]), only)  # checks the file and its ids
        if not keep.any():
            continue
        ids = np.arange(part.start, part.stop)  # read_part checked the part holds exactly these, in order
        for start, values in _batches(run.path / part.file, column, rows):
            here = keep[start:start + len(values)]
            if not here.any():
                continue
            values = values if here.all() else values[here]
            if unit_columns is not None:
                values = values[:, unit_columns]
            if standardizer is not None:
                values = ((values - standardizer[0]) / standardizer[1]).astype(np.float32)
            yield from blocks.add(ids[start:start + len(here)][here], values)
    yield from blocks.rest()


def _batches(path: Path, column: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, values [b, w] float32)`` of one fixed-size-list column of a part file, a batch at a time
    (:data:`BATCH_BYTES`, at most ``rows`` rows)."""
    start = 0
    # pre_buffer would read a row group's column chunks whole (on by default)
    with pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False) as reader:
        width = reader.schema_arrow.field(column).type.list_size
        batch_rows = max(1, min(rows, BATCH_BYTES // (4 * max(width, 1))))
        for batch in reader.iter_batches(batch_size=batch_rows, columns=[column]):
            values = list_values(batch.column(0))
            yield start, values
            start += len(values)


class _Blocks:
    """Rows gathered into blocks of exactly ``rows`` rows (the last one may be shorter), copied once."""

    def __init__(self, rows: int):
        self.rows = rows
        self.ids: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.filled = 0

    def add(self, ids: np.ndarray, values: np.ndarray) -> Iterator[Block]:
        done = 0
        while done < len(ids):
            if self.filled == 0 and len(ids) - done >= self.rows:  # a whole block in this piece: no copy
                yield ids[done:done + self.rows], values[done:done + self.rows]
                done += self.rows
                continue
            if self.values is None:
                self.ids = np.empty(self.rows, np.int64)
                self.values = np.empty((self.rows, values.shape[1]), np.float32)
            take = min(self.rows - self.filled, len(ids) - done)
            assert self.ids is not None
            self.ids[self.filled:self.filled + take] = ids[done:done + take]
            self.values[self.filled:self.filled + take] = values[done:done + take]
            self.filled += take
            done += take
            if self.filled == self.rows:
                yield from self.rest()

    def rest(self) -> Iterator[Block]:
        if self.filled:
            assert self.ids is not None and self.values is not None
            ids, values, filled = self.ids, self.values, self.filled
            self.ids, self.values, self.filled = None, None, 0
            yield ids[:filled], values[:filled]
