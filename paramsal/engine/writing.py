"""Writing a bulk job's parts: rows gathered per part, written off the compute thread, listed in the manifest.

A part is written by a thread of its own, so the device does not wait for
Parquet, sha256 and fsync; at most one part is being written while the next
fills, which bounds the memory. Each rank of a ``torchrun`` job lists its
parts in the one manifest it shares with the others, re-reading it under
:func:`paramsal.engine.lock.manifest_update` so that no listing is lost.
"""

from __future__ import annotations

import datetime as _dt
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paramsal.engine.backends import BatchResult
from paramsal.engine.integrity import check_file
from paramsal.engine.lock import manifest_update
from paramsal.engine.manifest import STATS, part_count, parts_of, read_manifest, write_manifest
from paramsal.engine.rundir import profile_table, write_part, write_stats
from paramsal.engine.stats import SaliencyStats
from paramsal.errors import EngineError


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
