"""The run directory: what a profiling job leaves on disk, and how it is read back.

```
run/
  manifest.json            config, fingerprints, versions, finished parts
  units.parquet            one row per unit
  stats.parquet            per unit: count, mean, m2, std (float64), when complete
  stats/part-*.parquet     the same moments for each finished part
  profiles/part-*.parquet  one row per sample
```

A part is finished once the manifest lists it. Files are written to a
temporary name and renamed, the manifest last, so a killed job leaves either
a whole part that the manifest lists or one it does not (and that a resumed
job rewrites with the same rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._io import atomic_path
from paramsal.errors import InputError, RunMismatchError
from paramsal.kernels.stats import SaliencyStats

FORMAT = "paramsal-run/1"
MANIFEST = "manifest.json"
UNITS = "units.parquet"
STATS = "stats.parquet"
PROFILES_DIR = "profiles"
PART_STATS_DIR = "stats"

#: Manifest keys that must agree before a job may continue a run.
IDENTITY_KEYS = ("model_fingerprint", "data_fingerprint", "units_fingerprint", "num_units", "num_samples",
                 "aggregation", "features")


@dataclass(frozen=True)
class Part:
    """A finished part: rows for samples ``start <= sample_id < stop``."""

    index: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"{PROFILES_DIR}/part-{self.index:05d}.parquet"

    @property
    def stats_file(self) -> str:
        return f"{PART_STATS_DIR}/part-{self.index:05d}.parquet"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "start": self.start, "stop": self.stop, "file": self.file}


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); is this a paramsal run directory?") from exc
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity keys on which two manifests differ."""
    return [k for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]


def check_same_run(root: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raises :class:`RunMismatchError` naming every identity key that differs."""
    differ = mismatches(existing, wanted)
    if differ:
        details = "; ".join(f"{k}: run has {existing.get(k)!r}, this job {wanted.get(k)!r}" for k in differ)
        raise RunMismatchError(f"{root} holds a run made with another {', '.join(differ)} ({details}). "
                               "Choose another directory, or pass overwrite=True / --overwrite to replace it")


def clear_run(root: Path) -> None:
    """Removes paramsal's own files from a run directory (and nothing else)."""
    for name in (MANIFEST, UNITS, STATS):
        (root / name).unlink(missing_ok=True)
    for folder in (PROFILES_DIR, PART_STATS_DIR):
        for path in (root / folder).glob("part-*.parquet"):
            path.unlink()


def profile_table(sample_ids: np.ndarray, targets: np.ndarray, outputs: np.ndarray, losses: np.ndarray,
                  profiles: np.ndarray, features: np.ndarray | None) -> pa.Table:
    """One row per sample, as in the run format.

    Args:
        sample_ids: ``[N]`` dataset indices.
        targets: ``[N]`` true classes.
        outputs: ``[N, C]`` logits.
        losses: ``[N]`` each sample's loss.
        profiles: ``[N, F]`` raw profiles.
        features: ``[N, D]`` penultimate features, or None.
    """
    logits = outputs.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    rows = np.arange(len(pred))
    columns = {
        "sample_id": pa.array(sample_ids, pa.int64()),
        "target": pa.array(targets, pa.int64()),
        "pred": pa.array(pred, pa.int64()),
        "loss": pa.array(losses, pa.float32()),
        "target_prob": pa.array(probs[rows, targets], pa.float32()),
        "pred_prob": pa.array(probs[rows, pred], pa.float32()),
        "correct": pa.array(pred == targets),
        "profile": _fixed_size_list(profiles),
    }
    if features is not None:
        columns["features"] = _fixed_size_list(features)
    return pa.table(columns)


def _fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_part(root: Path, part: Part, table: pa.Table, stats: SaliencyStats) -> None:
    """Writes a part's moments, then its rows; the caller lists it in the manifest afterwards."""
    for folder in (PROFILES_DIR, PART_STATS_DIR):
        (root / folder).mkdir(exist_ok=True)
    stats.save(root / part.stats_file)
    with atomic_path(root / part.file) as tmp:
        pq.write_table(table, tmp)


class Run:
    """A run directory opened for reading (see :func:`open_run`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise InputError(f"{self.path} is not a paramsal run directory (no {MANIFEST})")
        self.manifest = manifest
        self.parts = sorted((Part(p["index"], p["start"], p["stop"]) for p in manifest["parts"]),
                            key=lambda part: part.start)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, samples={self.num_samples}, units={self.num_units})"

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def num_units(self) -> int:
        return int(self.manifest["num_units"])

    @property
    def num_samples(self) -> int:
        """Samples written so far (all of the data set once the run is complete)."""
        return sum(p.stop - p.start for p in self.parts)

    @property
    def units(self) -> pa.Table:
        """One row per unit: unit_id, param, module, layer, channel, size."""
        return pq.read_table(self.path / UNITS)

    @property
    def stats(self) -> SaliencyStats:
        """Statistics over every sample written (merged from the parts while the run is unfinished)."""
        if self.complete and (self.path / STATS).is_file():
            return SaliencyStats.load(self.path / STATS)
        return merge_part_stats(self.path, self.parts, self.num_units)

    def table(self) -> pa.Table:
        """The per-sample columns (sample_id, target, pred, loss, ...), without profiles or features."""
        columns = ["sample_id", "target", "pred", "loss", "target_prob", "pred_prob", "correct"]
        return self._concat([pq.read_table(self.path / p.file, columns=columns) for p in self.parts], columns)

    @property
    def accuracy(self) -> float:
        correct = self.table().column("correct").to_numpy(zero_copy_only=False)
        return float(correct.mean()) if len(correct) else float("nan")

    def sample_ids(self, only: str | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Sample ids in row order, restricted like :meth:`profiles`."""
        table = self.table()
        ids = table.column("sample_id").to_numpy()
        return ids[self._row_mask(table, only)]

    def profiles(self, standardized: bool = True, layers: slice | Sequence[int] | None = None,
                 only: str | Sequence[int] | np.ndarray | None = None,
                 stats: SaliencyStats | Run | None = None) -> np.ndarray:
        """Profiles ``[n, f]`` (float32), reading one part at a time.

        Args:
            standardized: ``(s - mean) / std`` with this run's statistics (or ``stats``).
            layers: keep the units of these layer indices (a slice or a list of
                ``units.layer`` values), e.g. ``slice(0, 10)`` for shallow layers.
            only: "misclassified", "correct", or sample ids; default all rows.
            stats: statistics of another run (e.g. a reference set) to standardize with.

        Returns:
            Rows in sample-id order, columns in unit order.
        """
        return self._vectors("profile", self._unit_columns(layers), only,
                             self._standardizer(stats) if standardized else None)

    def features(self, only: str | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Penultimate features ``[n, D]`` (float32), if the run recorded them."""
        if not self.manifest.get("features"):
            raise InputError(f"{self.path} has no features: profile with features=True (--features)")
        return self._vectors("features", None, only, None)

    def summary(self) -> str:
        table = self.table()
        correct = table.column("correct").to_numpy(zero_copy_only=False)
        units = self.units
        layers = len(set(units.column("layer").to_pylist()))
        status = "complete" if self.complete else f"unfinished ({self.num_samples} of {self.manifest['num_samples']})"
        return "\n".join([
            f"run        {self.path} ({status})",
            f"model      {self.manifest['config'].get('model')}",
            f"data       {self.manifest['config'].get('data')}",
            f"samples    {len(correct)}",
            f"accuracy   {correct.mean():.4f} ({int((~correct).sum())} misclassified)" if len(correct) else
            "accuracy   -",
            f"units      {self.num_units} ({self.manifest['config'].get('units')}, "
            f"{self.manifest['aggregation']}) in {layers} layers",
        ])

    def _unit_columns(self, layers: slice | Sequence[int] | None) -> np.ndarray | None:
        if layers is None:
            return None
        layer_of_unit = self.units.column("layer").to_numpy()
        chosen = np.unique(layer_of_unit)[layers] if isinstance(layers, slice) else np.asarray(layers)
        return np.flatnonzero(np.isin(layer_of_unit, chosen))

    def _standardizer(self, stats: SaliencyStats | Run | None):
        stats = self.stats if stats is None else stats.stats if isinstance(stats, Run) else stats
        if stats.num_units != self.num_units:
            raise InputError(f"statistics of {stats.num_units} units cannot standardize a run of "
                             f"{self.num_units} units")
        return stats.mean, stats.std

    def _row_mask(self, table: pa.Table, only: str | Sequence[int] | np.ndarray | None) -> np.ndarray:
        if only is None:
            return np.ones(table.num_rows, dtype=bool)
        if isinstance(only, str):
            correct = table.column("correct").to_numpy(zero_copy_only=False)
            if only == "misclassified":
                return ~correct
            if only == "correct":
                return correct
            raise InputError(f"only={only!r}: expected 'misclassified', 'correct' or sample ids")
        return np.isin(table.column("sample_id").to_numpy(), np.asarray(only))

    def _vectors(self, column: str, unit_columns: np.ndarray | None, only, standardizer) -> np.ndarray:
        blocks = []
        for part in self.parts:
            table = pq.read_table(self.path / part.file, columns=["sample_id", "correct", column])
            mask = self._row_mask(table, only)
            vectors = table.column(column).combine_chunks()
            values = vectors.flatten().to_numpy().reshape(len(vectors), -1)[mask]
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

    @staticmethod
    def _concat(tables: list[pa.Table], columns: list[str]) -> pa.Table:
        if tables:
            return pa.concat_tables(tables)
        return pa.table({c: pa.array([], pa.bool_() if c == "correct" else pa.float64()) for c in columns})


def merge_part_stats(root: Path, parts: Sequence[Part], num_units: int) -> SaliencyStats:
    total = SaliencyStats(num_units)
    for part in parts:
        total = total.merge(SaliencyStats.load(root / part.stats_file))
    return total


def open_run(path: str | os.PathLike) -> Run:
    """Opens a run directory written by :func:`paramsal.profile_dataset` for reading."""
    return Run(path)
