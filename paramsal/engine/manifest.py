"""The run directory's layout and its manifest: what a run is, which parts are finished, and their checksums.

```
run/
  manifest.json            identity, config, versions, every finished file with its size and sha256
  lock                     held (flock) by the job writing the run
  units.parquet            one row per unit
  stats.parquet            per unit: count, mean, m2, std (float64), once complete
  stats/part-*.parquet     the same moments for each finished part
  profiles/part-*.parquet  one row per sample
```

Part ``i`` always holds samples ``i * R <= id < min((i + 1) * R, N)`` with
``R = batches_per_part * batch_size``: whole batches, so a part profiled
again (a resume, a repair) computes exactly the batches it had. The manifest
is checked whole when read: a damaged, edited or truncated manifest is an
error naming what is wrong, never a run read differently.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from paramsal._io import atomic_path
from paramsal.engine.ownership import MANIFEST, entries, is_run_manifest, linked, read_json
from paramsal.errors import RunCorruptError, RunMismatchError, StorageError
from paramsal.options import AGGREGATIONS, REFERENCES, UNRECORDED_DECODE

FORMAT = "paramsal-run/2"
UNITS = "units.parquet"
STATS = "stats.parquet"
PROFILES_DIR = "profiles"
PART_STATS_DIR = "stats"
#: Fitted POT tails of a complete run (derived data, listed in ``files``; :mod:`paramsal.engine.scoring`).
TAILS_DIR = "tails"

#: Manifest keys that must agree before a job may continue a run.
IDENTITY_KEYS = ("model_fingerprint", "data_fingerprint", "units_fingerprint", "num_units", "num_samples",
                 "aggregation", "features")

#: Config keys a resume must repeat: another value could change the numbers (rounding, batch composition).
NUMERIC_CONFIG = ("backend", "batch_size", "chunk_size", "device", "dtype", "features_module", "precision",
                  "channels_last", "target", "task", "deterministic")
#: What a config key added after runs were first written means when a run's manifest lacks it.
CONFIG_DEFAULTS = {"precision": "float32", "channels_last": False, "target": "label", "task": "classification",
                   "deterministic": False}

_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    def records(self) -> dict[str, dict[str, Any]]:
        """``{file: {"bytes", "sha256"}}`` of the part's profiles and moments, as the manifest records them."""
        return {self.file: {"bytes": self.bytes, "sha256": self.sha256},
                self.stats_file: {"bytes": self.stats_bytes, "sha256": self.stats_sha256}}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "file": self.file, "stats_file": self.stats_file}


def part_file(index: int) -> str:
    return f"{PROFILES_DIR}/part-{index:05d}.parquet"


def part_stats_file(index: int) -> str:
    return f"{PART_STATS_DIR}/part-{index:05d}.parquet"


def rows_per_part(manifest: dict[str, Any]) -> int:
    config = manifest["config"]
    return int(config["batches_per_part"]) * int(config["batch_size"])


def part_count(manifest: dict[str, Any]) -> int:
    """How many parts the whole data set makes."""
    return -(-int(manifest["num_samples"]) // rows_per_part(manifest))


def part_range(manifest: dict[str, Any], index: int) -> tuple[int, int]:
    rows = rows_per_part(manifest)
    return index * rows, min((index + 1) * rows, int(manifest["num_samples"]))


def tails_file(reference: str) -> str:
    """The file of the tails fitted on a named reference set ("all", "correct" or "class")."""
    return f"{TAILS_DIR}/{reference}.parquet"


def parts_of(manifest: dict[str, Any]) -> list[Part]:
    """The finished parts, in sample order (the manifest has been validated)."""
    fields = Part.__dataclass_fields__
    return sorted((Part(**{k: v for k, v in p.items() if k in fields}) for p in manifest["parts"]),
                  key=lambda part: part.index)


def run_identity(manifest: dict[str, Any]) -> str:
    """What tells this run from any other, even one made again in the same folder: the ``run_id`` drawn when it was
    created (runs written before there was one: a hash of when it was created and what it profiled)."""
    if isinstance(manifest.get("run_id"), str):
        return manifest["run_id"]
    keys = [manifest.get(k) for k in ("created", "model_fingerprint", "data_fingerprint", "units_fingerprint")]
    return hashlib.sha256(json.dumps(keys, default=str).encode()).hexdigest()[:32]


def new_run_id() -> str:
    return uuid.uuid4().hex


def own_files(root: Path, manifest: Any) -> list[str]:
    """The files of the run a manifest describes, which paramsal may delete: those it lists and, while the run is
    unfinished, those its jobs write just before listing them (a part's two files; the statistics).

    The manifest may be damaged or foreign: only names of this format are
    made, from the entries that have the right type, so no manifest can name
    a file elsewhere.
    """
    if not isinstance(manifest, dict):
        return []
    known = {UNITS, STATS, *map(tails_file, REFERENCES)}
    files = manifest.get("files")
    names = [name for name in files if name in known] if isinstance(files, dict) else []
    parts = manifest["parts"] if isinstance(manifest.get("parts"), list) else []
    indices = {p["index"] for p in parts if isinstance(p, dict) and _is(p.get("index"), int) and p["index"] >= 0}
    if _problem(manifest) is None and not manifest["complete"]:
        names.append(STATS)
        for folder in (PROFILES_DIR, PART_STATS_DIR):
            indices |= {i for i in map(part_index, entries(root, folder)) if i is not None and is_pending(manifest, i)}
    names += [name for index in sorted(indices) for name in (part_file(index), part_stats_file(index))]
    return list(dict.fromkeys(names))


def is_pending(manifest: dict[str, Any], index: int) -> bool:
    """Whether a job of this (validated) run may have written part ``index`` and been stopped before listing it: the
    run is unfinished and lacks that part, which a resume writes again."""
    return (not manifest["complete"] and 0 <= index < part_count(manifest)
            and all(p["index"] != index for p in manifest["parts"]))


def part_index(path: Path) -> int | None:
    """The index in a part file's name (``part-00012.parquet`` -> 12), or None for another name."""
    stem = path.name.removeprefix("part-").removesuffix(".parquet")
    return int(stem) if path.name.startswith("part-") and path.name.endswith(".parquet") and stem.isdigit() else None


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The validated manifest of ``root``, or None when there is none.

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
        manifest = read_json(path)
    except ValueError as exc:
        raise RunCorruptError(f"{path} {exc}; restore it from a copy of the run, or profile the data again into a "
                              "new folder") from None
    if not is_run_manifest(manifest):
        raise RunCorruptError(f"{path} is not a paramsal run manifest; is {root} a run directory?")
    if manifest["format"] != FORMAT:
        raise RunCorruptError(f"{path} is a {manifest['format']} manifest, written by another version of "
                              f"paramsal (this one reads {FORMAT}); profile the data again with --restart")
    problem = _problem(manifest)
    if problem:
        raise RunCorruptError(f"{path} is damaged: {problem}; restore it, or start the run over with --restart")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    path = root / MANIFEST
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    except OSError as exc:
        raise storage_error(path, exc) from exc


def storage_error(path: Path, exc: OSError) -> StorageError:
    """A write that failed (disk full, permissions), with the file's name and the way back."""
    return StorageError(f"could not write {path}: {exc.strerror or exc}; free space (or fix the permissions) "
                        "and run the same command again: the run resumes after its finished parts")


def _problem(manifest: dict[str, Any]) -> str | None:
    """What makes a manifest unusable, in words; None when it is sound.

    Every field a reader or an analysis uses is checked here for its type, so
    that a hand-edited or foreign manifest is named once, on opening, instead
    of failing somewhere downstream.
    """
    for key, kind in (("num_samples", int), ("num_units", int), ("parts", list), ("config", dict),
                      ("complete", bool), ("aggregation", str), ("features", bool)):
        if not _is(manifest.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    for key in ("num_samples", "num_units"):
        if manifest[key] < 1:
            return f"{key!r} is {manifest[key]}, not a positive integer"
    if manifest["aggregation"] not in AGGREGATIONS:
        return f"'aggregation' is {manifest['aggregation']!r}, not one of {', '.join(AGGREGATIONS)}"
    for key in ("model_fingerprint", "data_fingerprint", "units_fingerprint", "created", "updated", "run_id"):
        if key in manifest and not isinstance(manifest[key], str):
            return f"{key!r} is not a string"
    for key in ("source", "versions"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"{key!r} is not an object"
    config = manifest["config"]
    for key in ("batch_size", "batches_per_part"):
        if not _is(config.get(key), int) or config[key] < 1:
            return f"config {key!r} is missing or not a positive integer"
    for key in ("model", "data", "units", "backend", "device", "dtype", "precision", "task"):
        if config.get(key) is not None and not isinstance(config[key], str):
            return f"config {key!r} is not a string"
    files = manifest.get("files")
    if not isinstance(files, dict) or UNITS not in files or (manifest["complete"] and STATS not in files):
        return f"'files' does not record {UNITS}" + (f" and {STATS}" if manifest["complete"] else "")
    for name, record in files.items():
        if name not in (UNITS, STATS, *map(tails_file, REFERENCES)) or not _is_record(record):
            return f"'files' has a bad entry for {name!r}"
    seen: set[int] = set()
    for entry in manifest["parts"]:
        problem = _part_problem(manifest, entry)
        if problem:
            return problem
        if entry["index"] in seen:
            return f"part {entry['index']} is listed twice"
        seen.add(entry["index"])
    if manifest["complete"] and len(seen) != part_count(manifest):
        return f"it says complete but lists {len(seen)} of {part_count(manifest)} parts"
    return None


def _part_problem(manifest: dict[str, Any], entry: object) -> str | None:
    if not isinstance(entry, dict):
        return f"a part entry is a {type(entry).__name__}, not an object"
    for key in ("index", "start", "stop", "bytes", "stats_bytes", "nonfinite"):
        if not _is(entry.get(key), int) or entry[key] < 0:
            return f"part entry {_short(entry)} has no non-negative integer {key!r}"
    index = entry["index"]
    if index >= part_count(manifest) or (entry["start"], entry["stop"]) != part_range(manifest, index):
        return (f"part {index} covers samples {entry['start']}..{entry['stop'] - 1}, but a run of "
                f"{manifest['num_samples']} samples in parts of {rows_per_part(manifest)} has no such part")
    if not _is_record(entry) or not _is_record({"bytes": entry["stats_bytes"], "sha256": entry.get("stats_sha256")}):
        return f"part {index} has no valid sizes and sha256"
    if entry.get("file", part_file(index)) != part_file(index):
        return f"part {index} names the file {entry['file']!r}, not {part_file(index)!r}"
    return None


def _is_record(record: object) -> bool:
    """``{"bytes": size, "sha256": hex}``, as :func:`paramsal._io.file_record` makes."""
    return (isinstance(record, dict) and _is(record.get("bytes"), int) and isinstance(record.get("sha256"), str)
            and bool(_SHA256.fullmatch(record["sha256"])))


def _is(value: object, kind: type) -> bool:
    """``isinstance`` that does not take a bool for an int (JSON ``true`` is no index)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _short(entry: dict[str, Any]) -> str:
    text = json.dumps(entry)
    return text if len(text) <= 60 else text[:57] + "..."


def mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity keys on which two manifests differ."""
    return [k for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]


def mismatch_details(existing: dict[str, Any], wanted: dict[str, Any], names: tuple[str, str] = ("run", "this job")) \
        -> str:
    """The identity keys on which two manifests differ, in words ("another num_units (num_units: run has 5, this job
    6)"), or "" when they are one run's."""
    differ = mismatches(existing, wanted)
    if not differ:
        return ""
    details = "; ".join(f"{k}: {names[0]} has {existing.get(k)!r}, {names[1]} {wanted.get(k)!r}" for k in differ)
    return f"another {', '.join(differ)} ({details})"


def check_same_run(root: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raises :class:`RunMismatchError` naming every identity key that differs."""
    details = mismatch_details(existing, wanted)
    if details:
        raise RunMismatchError(f"{root} holds a run made with {details}. Choose another directory, or pass "
                               "overwrite=True / --overwrite to replace it")


def config_mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The keys of :data:`NUMERIC_CONFIG` on which two manifests differ."""
    return [k for k in NUMERIC_CONFIG if _config(existing, k) != _config(wanted, k)]


def _config(manifest: dict[str, Any], key: str) -> Any:
    return manifest["config"].get(key, CONFIG_DEFAULTS.get(key))


def resume_notes(root: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What a resume keeps from the run although this job asked otherwise; raises where numbers could change.

    Raises:
        RunMismatchError: naming a config key of :data:`NUMERIC_CONFIG` that differs.
    """
    old, new = existing["config"], wanted["config"]
    differ = config_mismatches(existing, wanted)
    if differ:
        details = "; ".join(f"{k}: run has {_config(existing, k)!r}, this job {_config(wanted, k)!r}"
                            for k in differ)
        raise RunMismatchError(
            f"{root} was profiled with another {', '.join(differ)} ({details}), which could change the "
            f"numbers of the samples still to do; resume with the run's own settings, or start over with "
            "--restart / resume=False, overwrite=True")
    notes = []
    for key in ("model", "data", "batches_per_part"):
        if old.get(key) != new.get(key):
            notes.append(f"config {key}: the run keeps {old.get(key)!r} (this job said {new.get(key)!r})")
    if existing.get("source") != wanted.get("source") and wanted.get("source"):
        notes.append(f"source: the run keeps {existing.get('source')!r}")
    return notes


def repair_hint(root: Path, manifest: dict[str, Any]) -> str:
    """How to make the run whole again: its own profile command with ``--repair``."""
    source = manifest.get("source") or {}
    if not (source.get("model") and source.get("data")):
        return "call profile_dataset(...) as the run was made, with repair=True"
    words = ["paramsal", "profile", "--model", source["model"], "--data", source["data"], "--out", str(root),
             "--batch-size", str(manifest["config"]["batch_size"])]
    if source["data"].startswith("imagefolder:") and not source.get("decode"):
        source = {**source, "decode": UNRECORDED_DECODE}
    for flag, key in (("--weights", "weights"), ("--num-classes", "num_classes"), ("--transform", "transform"),
                      ("--decode", "decode"), ("--limit", "limit")):
        if source.get(key) is not None:
            words += [flag, str(source[key])]
    return f"run `{' '.join(words)} --repair`"

