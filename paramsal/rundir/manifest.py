"""The run directory's layout and its manifest, typed: what a run is, which parts are finished, their checksums.

```
run/
  manifest.json            identity, config, versions, every finished file with its size and sha256
  lock                     held (flock) by the job writing the run
  units.parquet            one row per unit
  stats.parquet            per unit: count, mean, m2, std (float64), once complete
  stats/part-*.parquet     the same moments for each finished part
  profiles/part-*.parquet  one row per sample
  tails/REFERENCE.parquet  POT tails, once ``paramsal tails`` stored them
  analyses/, report/       results saved from the run, each with its record (:mod:`paramsal.rundir.published`)
```

Part ``i`` always holds samples ``i * R <= id < min((i + 1) * R, N)`` with
``R = batches_per_part * batch_size``: whole batches, so a part profiled
again (a resume, a repair) computes exactly the batches it had.

:class:`Manifest` is ``manifest.json`` as objects (:class:`RunConfig`,
:class:`Source`, :class:`FileRecord`, :class:`Part`), read by
:meth:`Manifest.from_json`, which checks the whole document first: a
damaged, edited or truncated manifest is an error naming what is wrong,
never a run read differently. Runs written before a field existed read with
its documented default (:data:`CONFIG_DEFAULTS`); fields this version does not
know are kept and written back as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramsal._io import atomic_path
from paramsal.errors import RunCorruptError, StorageError
from paramsal.rundir.format import FORMAT, document_problem
from paramsal.rundir.layout import (
    PART_STATS_DIR,
    PROFILES_DIR,
    STATS,
    UNITS,
    part_file,
    part_index,
    part_stats_file,
    tails_file,
)
from paramsal.rundir.ownership import MANIFEST, entries, is_run_manifest, linked, read_json

#: What a config field added after runs were first written means when a run's manifest lacks it.
CONFIG_DEFAULTS = {"precision": "float32", "channels_last": False, "target": "label", "task": "classification",
                   "deterministic": False, "world_size": 1}


@dataclass(frozen=True)
class Part:
    """A finished part: rows for samples ``start <= sample_id < stop``, and its two files' sizes and sha256."""

    index: int
    start: int
    stop: int
    bytes: int
    sha256: str
    stats_bytes: int
    stats_sha256: str
    backend: str
    nonfinite: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def file(self) -> str:
        return part_file(self.index)

    @property
    def stats_file(self) -> str:
        return part_stats_file(self.index)

    @property
    def records(self) -> dict[str, FileRecord]:
        """The part's profiles and moments files, as the manifest records them."""
        return {self.file: FileRecord(self.bytes, self.sha256),
                self.stats_file: FileRecord(self.stats_bytes, self.stats_sha256)}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Part:
        return cls(**{k: entry[k] for k in (f.name for f in dataclasses.fields(cls)) if k in entry})

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "file": self.file, "stats_file": self.stats_file}


@dataclass(frozen=True)
class FileRecord:
    """A file of the run: its size and sha256 (and, for stored tails, their format and the statistics they were
    fitted on)."""

    bytes: int
    sha256: str
    format: str | None = None
    fitted_on: str | None = None

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FileRecord:
        return cls(record["bytes"], record["sha256"], record.get("format"), record.get("fitted_on"))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class RunConfig:
    """How the run was profiled: the settings a resume keeps or must repeat (:data:`NUMERIC_CONFIG`)."""

    batch_size: int
    batches_per_part: int
    model: str | None = None
    data: str | None = None
    units: str | None = None
    backend: str = "auto"
    chunk_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    features_module: str | None = None
    precision: str = "float32"
    channels_last: bool = False
    target: str | int = "label"
    task: str = "classification"
    world_size: int = 1
    deterministic: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rows_per_part(self) -> int:
        return self.batches_per_part * self.batch_size


@dataclass
class Source:
    """How to load the run's model and data again (the command line's specs), read as data: nothing named here is
    imported or called unless the caller trusts the run."""

    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    data: str | None = None
    transform: str | None = None
    decode: str | None = None
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Manifest:
    """``manifest.json``: what the run is (its identity), how it was made, and every finished file."""

    config: RunConfig
    num_samples: int
    num_units: int
    aggregation: str
    features: bool
    complete: bool = False
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    units_fingerprint: str | None = None
    run_id: str | None = None
    created: str | None = None
    updated: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    source: Source = field(default_factory=Source)
    files: dict[str, FileRecord] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    merged_from: list[str] | None = None
    merge_of: list[str] | None = None
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rows_per_part(self) -> int:
        return self.config.rows_per_part

    @property
    def part_count(self) -> int:
        """How many parts the whole data set makes."""
        return -(-self.num_samples // self.rows_per_part)

    def part_range(self, index: int) -> tuple[int, int]:
        rows = self.rows_per_part
        return index * rows, min((index + 1) * rows, self.num_samples)

    @property
    def listed(self) -> list[Part]:
        """The finished parts, in sample order."""
        return sorted(self.parts, key=lambda part: part.index)

    def list_part(self, part: Part) -> None:
        self.parts = sorted([p for p in self.parts if p.index != part.index] + [part], key=lambda p: p.index)

    @property
    def identity(self) -> str:
        """What tells this run from any other, even one made again in the same folder: the ``run_id`` drawn when it
        was created (runs written before there was one: a hash of when it was created and what it profiled)."""
        if self.run_id is not None:
            return self.run_id
        keys = [self.created, self.model_fingerprint, self.data_fingerprint, self.units_fingerprint]
        return hashlib.sha256(json.dumps(keys, default=str).encode()).hexdigest()[:32]

    def is_pending(self, index: int) -> bool:
        """Whether a job of this run may have written part ``index`` and been stopped before listing it: the run is
        unfinished and lacks that part, which a resume writes again."""
        return not self.complete and 0 <= index < self.part_count and all(p.index != index for p in self.parts)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Manifest:
        """The manifest of a checked document (:func:`paramsal.rundir.format.document_problem` is None)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"config", "source", "files", "parts", "extra"}
        config_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"extra"}
        source_fields = {f.name for f in dataclasses.fields(Source)} - {"extra"}
        raw_config, raw_source = document["config"], document.get("source") or {}
        config = RunConfig(**{**CONFIG_DEFAULTS, **{k: v for k, v in raw_config.items() if k in config_fields}},
                           extra={k: v for k, v in raw_config.items() if k not in config_fields})
        source = Source(**{k: v for k, v in raw_source.items() if k in source_fields},
                        extra={k: v for k, v in raw_source.items() if k not in source_fields})
        return cls(config=config, source=source,
                   files={name: FileRecord.from_json(record) for name, record in document["files"].items()},
                   parts=sorted((Part.from_json(p) for p in document["parts"]), key=lambda p: p.index),
                   **{k: document[k] for k in known if k in document},
                   extra={k: v for k, v in document.items() if k not in known | {"config", "source", "files",
                                                                                 "parts"}})

    def __getitem__(self, key: str) -> Any:
        """A field of the JSON document (``run.manifest["config"]["model"]``), for code written while the manifest
        was a dict; paramsal's own code reads the typed fields."""
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def to_json(self) -> dict[str, Any]:
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"}
        source = {k: v for k, v in dataclasses.asdict(self.source).items() if k != "extra" and v is not None}
        document = {"format": self.format, "run_id": self.run_id, "created": self.created, "updated": self.updated,
                    "complete": self.complete, "config": {**config, **self.config.extra},
                    "aggregation": self.aggregation, "features": self.features, "num_units": self.num_units,
                    "num_samples": self.num_samples, "model_fingerprint": self.model_fingerprint,
                    "data_fingerprint": self.data_fingerprint, "units_fingerprint": self.units_fingerprint,
                    "versions": self.versions, "source": {**source, **self.source.extra},
                    "files": {name: record.to_json() for name, record in self.files.items()},
                    "parts": [p.to_json() for p in self.listed], "merged_from": self.merged_from,
                    "merge_of": self.merge_of, **self.extra}
        return {k: v for k, v in document.items() if v is not None}


def new_run_id() -> str:
    return uuid.uuid4().hex


def own_files(root: Path, document: Any) -> list[str]:
    """The files of the run a manifest describes, which paramsal may delete: those it lists and, while the run is
    unfinished, those its jobs write just before listing them (a part's two files; the statistics).

    Args:
        document: the manifest as read from JSON, which may be damaged or foreign: only names of this format are
            made, from the entries that have the right type, so no manifest can name a file elsewhere.
    """
    if not isinstance(document, dict):
        return []
    known = {UNITS, STATS, *(tails_file(r) for r in ("all", "correct", "class"))}
    files = document.get("files")
    names = [name for name in files if name in known] if isinstance(files, dict) else []
    parts = document["parts"] if isinstance(document.get("parts"), list) else []
    indices = {p["index"] for p in parts if isinstance(p, dict) and isinstance(p.get("index"), int)
               and not isinstance(p["index"], bool) and p["index"] >= 0}
    if document_problem(document) is None and not document["complete"]:
        manifest = Manifest.from_json(document)
        names.append(STATS)
        for folder in (PROFILES_DIR, PART_STATS_DIR):
            indices |= {i for i in map(part_index, entries(root, folder)) if i is not None and manifest.is_pending(i)}
    names += [name for index in sorted(indices) for name in (part_file(index), part_stats_file(index))]
    return list(dict.fromkeys(names))


def read_manifest(root: Path) -> Manifest | None:
    """The checked manifest of ``root``, or None when there is none.

    Raises:
        RunCorruptError: the manifest is a link, is not JSON (or nests too
            deeply to be a manifest), is not in the run format, or is damaged.
    """
    path = root / MANIFEST
    if path.is_symlink():
        raise linked(root, path)
    if not path.exists():
        return None
    try:
        document = read_json(path)
    except ValueError as exc:
        raise RunCorruptError(f"{path} {exc}; restore it from a copy of the run, or profile the data again into a "
                              "new folder") from None
    if not is_run_manifest(document):
        raise RunCorruptError(f"{path} is not a paramsal run manifest; is {root} a run directory?")
    if document["format"] != FORMAT:
        raise RunCorruptError(f"{path} is a {document['format']} manifest, written by another version of "
                              f"paramsal (this one reads {FORMAT}); profile the data again (resume=False)")
    problem = document_problem(document)
    if problem:
        raise RunCorruptError(f"{path} is damaged: {problem}; restore it, or start the run over (resume=False)")
    return Manifest.from_json(document)


def write_manifest(root: Path, manifest: Manifest) -> None:
    path = root / MANIFEST
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    except OSError as exc:
        raise storage_error(path, exc) from exc


def storage_error(path: Path, exc: OSError) -> StorageError:
    """A write that failed (disk full, permissions), with the file's name and the way back."""
    return StorageError(f"could not write {path}: {exc.strerror or exc}; free space (or fix the permissions) "
                        "and run the same command again: the run resumes after its finished parts")


__all__ = ["CONFIG_DEFAULTS", "FileRecord", "Manifest", "Part", "RunConfig", "Source", "new_run_id", "own_files",
           "read_manifest", "storage_error", "write_manifest"]
