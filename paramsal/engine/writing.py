"""Writing a run's files: its parts (rows gathered per part, written off the compute thread, listed in the
manifest), its units and statistics, and clearing a run that is replaced.

A part is written by a thread of its own, so the device does not wait for
Parquet, sha256 and fsync; at most one part is being written while the next
fills, which bounds the memory. Each rank of a ``torchrun`` job lists its
parts in the one manifest it shares with the others, re-reading it under
:func:`paramsal.engine.lock.manifest_update` so that no listing is lost.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from paramsal._io import atomic_path, file_record
from paramsal.engine.backends import BatchResult
from paramsal.engine.integrity import check_file, temporaries
from paramsal.engine.lock import manifest_update
from paramsal.engine.manifest import (PART_STATS_DIR, PROFILES_DIR, STATS, UNITS, Part, own_files, part_count,
                                      part_file, part_stats_file, parts_of, read_manifest, storage_error,
                                      write_manifest)
from paramsal.engine.ownership import folder, inside, remove
from paramsal.engine.published import unpublish_all
from paramsal.engine.reading import ROW_GROUP_ROWS
from paramsal.engine.stats import SaliencyStats
from paramsal.errors import EngineError


def profile_table(sample_ids: np.ndarray, targets: np.ndarray, outputs: np.ndarray, losses: np.ndarray,
                  profiles: np.ndarray, features: np.ndarray | None,
                  nonfinite_params: Sequence[str | None] | None = None) -> pa.Table:
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
        "correct": pa.array(pred == targets),
        "nonfinite": pa.array([flag is not None for flag in flags]),
        "nonfinite_param": pa.array(flags, pa.string()),
        "profile": _fixed_size_list(profiles),
    }
    if features is not None:
        columns["features"] = _fixed_size_list(features)
    return pa.table(columns)


def _fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_part(root: Path, index: int, table: pa.Table, stats: SaliencyStats, backend: str) -> Part:
    """Writes a part's moments, then its rows, durably; returns its record for the manifest (listed by the caller).

    Args:
        table: the part's rows (:func:`profile_table`), samples ``start..stop-1`` in order.
        stats: the moments of the part's finite rows.
        backend: the backend that computed the rows.
    """
    ids = table.column("sample_id").to_numpy()
    for name in (PROFILES_DIR, PART_STATS_DIR):
        folder(root, name, create=True)
    moments = _write_table(root, part_stats_file(index), stats.to_arrow())
    rows = _write_table(root, part_file(index), table, ROW_GROUP_ROWS)  # readers decode a row group at a time
    return Part(index, int(ids[0]), int(ids[-1]) + 1, rows["bytes"], rows["sha256"], moments["bytes"],
                moments["sha256"], backend, int(np.asarray(table.column("nonfinite")).sum()))


def write_units(root: Path, table: pa.Table, listed: Callable[[dict[str, Any]], None] | None = None) \
        -> dict[str, Any]:
    """Writes ``units.parquet``; returns its record for the manifest's ``files``.

    Args:
        listed: called with the record once the file is written but before it
            takes its name, to list it in the manifest first: a new run's
            manifest must exist before any file of the run does, or a job
            killed in between would leave a folder that is not yet a run.
    """
    return _write_table(root, UNITS, table, listed=listed)


def write_stats(root: Path, stats: SaliencyStats) -> dict[str, Any]:
    """Writes ``stats.parquet``; returns its record for the manifest's ``files``."""
    return _write_table(root, STATS, stats.to_arrow())


def _write_table(root: Path, name: str, table: pa.Table, row_group_rows: int | None = None,
                 listed: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Writes ``table`` to ``root/name`` durably (row groups of at most ``row_group_rows``); returns the file's size
    and sha256 for the manifest (passed to ``listed`` before the file takes its name, when given)."""
    path = inside(root, name)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_rows)
            record = file_record(tmp)
            if listed is not None:
                listed(record)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    return record


def clear_run(root: Path, manifest: Any) -> None:
    """Removes the run a manifest describes: its files (:func:`~paramsal.engine.manifest.own_files`), the results
    saved from it, and the temporaries of killed jobs; nothing else. The manifest itself stays until the new run's
    replaces it, and the lock stays with its holder."""
    for name in own_files(root, manifest):
        remove(root, name)
    for name in ("analyses", "report"):
        unpublish_all(root, name)
    for path in temporaries(root):
        remove(root, str(path.relative_to(root)))


class PartBuffer:
    """The batches of the part being filled, already on the host."""

    def __init__(self, index: int):
        self.index = index
        self.stop = -1
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                       ("ids", "targets", "profiles", "outputs", "losses", "features")}
        self.flags: list[str | None] = []

    def add(self, ids: torch.Tensor, targets: torch.Tensor, result: BatchResult, flags: list[str | None]) -> None:
        for name, values in (("ids", ids), ("targets", targets), ("profiles", result.profiles),
                             ("outputs", result.outputs), ("losses", result.losses), ("features", result.features)):
            if values is not None:
                self.columns[name].append(values)
        self.flags += flags
        self.stop = int(ids[-1]) + 1

    def cat(self, name: str) -> np.ndarray:
        return torch.cat(self.columns[name]).float().numpy()

    def features(self) -> np.ndarray | None:
        return self.cat("features") if self.columns["features"] else None


class PartWriter:
    """Writes finished parts on a background thread, one at a time; :meth:`close` waits and raises its error."""

    def __init__(self, root: Path, aggregation: str, num_units: int):
        self.root, self.aggregation, self.num_units = root, aggregation, num_units
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paramsal-writer")
        self._pending: Future | None = None

    def write(self, buffer: PartBuffer, backend: str) -> None:
        """Queues ``buffer``'s part, after the previous part is written (so at most two parts are in memory)."""
        self._wait()
        self._pending = self._pool.submit(self._write, buffer, backend)

    def close(self) -> None:
        """Waits for the part being written; raises the error writing it raised."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, buffer: PartBuffer, backend: str) -> None:
        profiles = torch.cat(buffer.columns["profiles"])  # a part's profiles are the bulk of it: joined once
        table = profile_table(torch.cat(buffer.columns["ids"]).numpy(), torch.cat(buffer.columns["targets"]).numpy(),
                              buffer.cat("outputs"), buffer.cat("losses"), profiles.float().numpy(), buffer.features(),
                              buffer.flags)
        finite = torch.tensor([flag is None for flag in buffer.flags])
        stats = SaliencyStats(self.num_units, self.aggregation).update(profiles[finite])
        part = write_part(self.root, buffer.index, table, stats, backend)
        with manifest_update(self.root):
            manifest = _current_manifest(self.root)
            manifest["parts"] = sorted(manifest["parts"] + [part.to_json()], key=lambda p: p["index"])
            manifest["updated"] = now()
            write_manifest(self.root, manifest)


def finish_run(root: Path) -> None:
    """Once every part is listed: the statistics merged from the parts in part order, then ``complete``."""
    with manifest_update(root):
        manifest = _current_manifest(root)
        parts = parts_of(manifest)
        if manifest["complete"] or len(parts) < part_count(manifest):
            return
        stats = SaliencyStats(int(manifest["num_units"]))
        for part in parts:
            check_file(root, part.stats_file, part.records[part.stats_file], manifest)
            stats = stats.merge(SaliencyStats.load(root / part.stats_file))
        stats.aggregation = manifest["aggregation"]
        manifest["files"][STATS] = write_stats(root, stats)
        manifest["complete"] = True
        manifest["updated"] = now()
        write_manifest(root, manifest)


def _current_manifest(root: Path) -> dict[str, Any]:
    manifest = read_manifest(root)
    if manifest is None:
        raise EngineError(f"{root}/manifest.json vanished while the job was writing the run")
    return manifest


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
