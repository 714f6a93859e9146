"""Writing a run's files: its parts (a part's batches gathered on the host, written by threads of their own and
listed in the manifest), its units and statistics, and clearing a run that is replaced.

The device must not wait for the host, so the host's work per row is kept
small and off the compute thread: a part's moments come with its batches
(computed on the device, or here by the writer on a CPU), its batches are
written as they are, one Parquet row group each, without joining them, and
the profile column, incompressible floats, is written without compression,
dictionary or statistics; the file is hashed as it is written rather than read
back. Several threads write parts side by side where there are cores to
spare, at most that many parts held at once. Each rank of a ``torchrun`` job
lists its parts in the one manifest it shares with the others, re-reading it
under :func:`paramsal.rundir.lock.manifest_update` so that no listing is lost.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._arrow import fixed_size_list
from paramsal._io import HashingFile, atomic_path
from paramsal.errors import EngineError
from paramsal.ranking.stats import Moments, SaliencyStats, chan_merge, finite_moments
from paramsal.rundir.integrity import ANSWER_COLUMNS, check_file, temporaries
from paramsal.rundir.layout import PART_STATS_DIR, PROFILES_DIR, STATS, UNITS, part_file, part_stats_file
from paramsal.rundir.lock import manifest_update
from paramsal.rundir.manifest import FileRecord, Manifest, Part, own_files, read_manifest, storage_error, write_manifest
from paramsal.rundir.ownership import folder, inside, remove
from paramsal.rundir.published import unpublish_all
from paramsal.rundir.reading import ROW_GROUP_ROWS


def profile_table(sample_ids: np.ndarray, targets: np.ndarray, outputs: np.ndarray, losses: np.ndarray,
                  profiles: np.ndarray, features: np.ndarray | None,
                  nonfinite_params: Sequence[str | None] | None = None,
                  judged: Mapping[str, np.ndarray] | None = None) -> pa.Table:
    """One row per sample, as in the run format.

    Args:
        sample_ids: ``[N]`` dataset indices.
        targets: ``[N]`` true classes.
        outputs: ``[N, C]`` logits.
        losses: ``[N]`` each sample's loss.
        profiles: ``[N, F]`` raw profiles.
        features: ``[N, D]`` penultimate features, or None.
        nonfinite_params: per sample, None, or the first parameter whose
            gradient was not finite ("(loss)" when only the loss was): the row is
            flagged and left out of statistics and default selections.
        judged: where something other than ``pred == target`` judges each sample (a chat model's whole greedy
            answer: task "answer"), its ``[N]`` columns: ``correct`` and :data:`ANSWER_COLUMNS`.
    """
    logits = outputs.astype(np.float64)
    with np.errstate(invalid="ignore"):
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
    pred = np.nan_to_num(probs, nan=-1.0).argmax(1)
    rows = np.arange(len(pred))
    flags = list(nonfinite_params) if nonfinite_params is not None else [None] * len(pred)
    columns = {
        "sample_id": pa.array(sample_ids, pa.int64()),
        "target": pa.array(targets, pa.int64()),
        "pred": pa.array(pred, pa.int64()),
        "loss": pa.array(losses, pa.float32()),
        "target_prob": pa.array(probs[rows, targets], pa.float32()),
        "pred_prob": pa.array(probs[rows, pred], pa.float32()),
        "correct": pa.array(pred == targets if judged is None else np.asarray(judged["correct"], bool)),
        "nonfinite": pa.array([flag is not None for flag in flags]),
        "nonfinite_param": pa.array(flags, pa.string()),
    }
    if judged is not None:
        columns.update({name: pa.array(judged[name], kind) for name, kind in ANSWER_COLUMNS.items()})
    columns["profile"] = fixed_size_list(profiles)
    if features is not None:
        columns["features"] = fixed_size_list(features)
    return pa.table(columns)


#: How tables of a run are written: its profiles are incompressible float32 values, where compression, dictionary
#: encoding and column statistics each cost a pass over the data for nothing (together they halved the rate of
#: the write path, measured at ResNet-50's 26,560 units per row); the statistics of ``sample_id`` stay.
WRITE_OPTIONS: dict[str, Any] = {"compression": "NONE", "use_dictionary": False, "write_statistics": ["sample_id"]}


def write_part(root: Path, index: int, tables: pa.Table | Sequence[pa.Table], stats: SaliencyStats,
               backend: str) -> Part:
    """Writes a part's moments, then its rows, durably; returns its record for the manifest (listed by the caller).

    Args:
        tables: the part's rows (:func:`profile_table`), samples ``start..stop-1`` in order: one table, or one per
            batch, each written as it is (row groups of at most :data:`~paramsal.rundir.reading.ROW_GROUP_ROWS`).
        stats: the moments of the part's finite rows.
        backend: the backend that computed the rows.
    """
    tables = [tables] if isinstance(tables, pa.Table) else list(tables)
    ids = [t.column("sample_id") for t in tables]
    for name in (PROFILES_DIR, PART_STATS_DIR):
        folder(root, name, create=True)
    moments = _write_table(root, part_stats_file(index), stats.to_arrow())
    rows = _write_table(root, part_file(index), tables, ROW_GROUP_ROWS)  # readers decode a row group at a time
    flagged = sum(int(np.asarray(t.column("nonfinite")).sum()) for t in tables)
    return Part(index, int(ids[0][0].as_py()), int(ids[-1][-1].as_py()) + 1, rows.bytes, rows.sha256,
                moments.bytes, moments.sha256, backend, flagged)


def write_units(root: Path, table: pa.Table, listed: Callable[[FileRecord], None] | None = None) -> FileRecord:
    """Writes ``units.parquet``; returns its record for the manifest's ``files``.

    Args:
        listed: called with the record once the file is written but before it
            takes its name, to list it in the manifest first: a new run's
            manifest must exist before any file of the run does, or a job
            killed in between would leave a folder that is not yet a run.
    """
    return _write_table(root, UNITS, table, listed=listed)


def write_stats(root: Path, stats: SaliencyStats) -> FileRecord:
    """Writes ``stats.parquet``; returns its record for the manifest's ``files``."""
    return _write_table(root, STATS, stats.to_arrow())


def _write_table(root: Path, name: str, tables: pa.Table | Sequence[pa.Table], row_group_rows: int | None = None,
                 listed: Callable[[FileRecord], None] | None = None) -> FileRecord:
    """Writes a table (or several, one after the other) to ``root/name`` durably, in row groups of at most
    ``row_group_rows``; returns the file's size and sha256 for the manifest, taken as it is written (passed to
    ``listed`` before the file takes its name, when given)."""
    path = inside(root, name)
    table = tables if isinstance(tables, pa.Table) else pa.concat_tables(tables)  # the batches' chunks, not copied
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            sink = HashingFile(file)
            pq.write_table(table, sink, row_group_size=row_group_rows, **WRITE_OPTIONS)
            file.flush()
            record = FileRecord.from_json(sink.record())
            if listed is not None:
                listed(record)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    return record


def clear_run(root: Path, manifest: Any) -> None:
    """Removes the run a manifest describes: its files (:func:`~paramsal.rundir.manifest.own_files`), the results
    saved from it, and the temporaries of killed jobs; nothing else. The manifest itself stays until the new run's
    replaces it, and the lock stays with its holder."""
    for name in own_files(root, manifest):
        remove(root, name)
    for name in ("analyses", "report"):
        unpublish_all(root, name)
    for path in temporaries(root):
        remove(root, str(path.relative_to(root)))


@dataclass
class LandedBatch:
    """One batch's rows on the host, as a part gathers them (arrays: the writer never sees a tensor).

    Attributes:
        ids: ``[b]`` sample ids; targets: ``[b]`` the labels the sample table records.
        logits: ``[b, C]`` the outputs the table describes; losses: ``[b]``.
        profiles: ``[b, F]`` float32 raw profiles; features: ``[b, D]`` or None.
        flags: per sample, None or the first parameter whose gradient was not finite.
        moments: the float64 moments of its finite rows, when the device computed them; None: the writer does.
        judged: ``[b]`` columns of each sample's judgement where the task judges it otherwise (:func:`profile_table`).
    """

    ids: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    losses: np.ndarray
    profiles: np.ndarray
    features: np.ndarray | None
    flags: list[str | None]
    moments: Moments | None = None
    judged: Mapping[str, np.ndarray] | None = None

    def table(self) -> pa.Table:
        """The batch's rows (:func:`profile_table`), its arrays viewed, not copied."""
        return profile_table(self.ids, self.targets, self.logits, self.losses, self.profiles, self.features,
                             self.flags, self.judged)

    def finite_moments(self) -> Moments:
        if self.moments is not None:
            return self.moments
        return finite_moments(self.profiles, np.array([flag is None for flag in self.flags], bool))


class PartBuffer:
    """The batches of the part being filled, already on the host."""

    def __init__(self, index: int):
        self.index = index
        self.stop = -1
        self.batches: list[LandedBatch] = []

    def add(self, batch: LandedBatch) -> None:
        self.batches.append(batch)
        self.stop = int(batch.ids[-1]) + 1

    def stats(self, num_units: int, aggregation: str) -> SaliencyStats:
        """The moments of the part's finite rows: its batches' merged in order (the same bits on a resume)."""
        moments: Moments = (0, np.zeros(num_units), np.zeros(num_units))
        for batch in self.batches:
            moments = chan_merge(moments, batch.finite_moments())
        return SaliencyStats(num_units, aggregation, *moments)


class PartWriter:
    """Writes finished parts on threads of their own; :meth:`close` waits and raises their first error.

    Args:
        threads: parts written side by side; at most this many are held besides the one being filled.
    """

    def __init__(self, root: Path, aggregation: str, num_units: int, threads: int = 1):
        self.root, self.aggregation, self.num_units = root, aggregation, num_units
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="paramsal-writer")
        self._pending: list[Future] = []

    def write(self, buffer: PartBuffer, backend: str) -> None:
        """Queues ``buffer``'s part, once fewer than ``threads`` parts are being written (memory stays bounded)."""
        while len(self._pending) >= self._threads:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._write, buffer, backend))

    def close(self) -> None:
        """Waits for the parts being written; raises the first error writing them raised."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)

    def _write(self, buffer: PartBuffer, backend: str) -> None:
        stats = buffer.stats(self.num_units, self.aggregation)
        part = write_part(self.root, buffer.index, [batch.table() for batch in buffer.batches], stats, backend)
        with manifest_update(self.root):
            manifest = _current_manifest(self.root)
            manifest.list_part(part)
            manifest.updated = now()
            write_manifest(self.root, manifest)


def finish_run(root: Path) -> None:
    """Once every part is listed: the statistics merged from the parts in part order, then ``complete``."""
    with manifest_update(root):
        manifest = _current_manifest(root)
        parts = manifest.listed
        if manifest.complete or len(parts) < manifest.part_count:
            return
        stats = SaliencyStats(manifest.num_units)
        for part in parts:
            check_file(root, part.stats_file, part.records[part.stats_file], manifest)
            stats = stats.merge(SaliencyStats.load(root / part.stats_file))
        stats.aggregation = manifest.aggregation
        manifest.files[STATS] = write_stats(root, stats)
        manifest.complete = True
        manifest.updated = now()
        write_manifest(root, manifest)


def _current_manifest(root: Path) -> Manifest:
    manifest = read_manifest(root)
    if manifest is None:
        raise EngineError(f"{root}/manifest.json vanished while the job was writing the run")
    return manifest


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
