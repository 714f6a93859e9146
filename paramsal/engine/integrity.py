"""Checks that a run directory's files are the ones its manifest lists: sizes, checksums, rows, ids, strays.

Readers check each file they open (:func:`check_file`, :func:`check_part_rows`);
``paramsal verify RUN`` (:func:`verify_run`) checks everything at once and
lists every problem with the way to repair it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._io import file_record, is_temporary
from paramsal.engine.manifest import (PART_STATS_DIR, PROFILES_DIR, Part, part_count, parts_of, read_manifest,
                                      repair_hint)
from paramsal.errors import ParamsalError, RunCorruptError


def check_file(root: Path, name: str, record: dict[str, Any], manifest: dict[str, Any], *,
               checksum: bool = True) -> None:
    """Raises :class:`RunCorruptError` unless ``root/name`` exists with the recorded size (and sha256)."""
    path = root / name
    if not path.is_file():
        raise _damaged(root, manifest, f"{path} is listed in the manifest but missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise _damaged(root, manifest, f"{path} has {size} bytes where the manifest records {record['bytes']} "
                                       "(truncated or overwritten)")
    if checksum and file_record(path)["sha256"] != record["sha256"]:
        raise _damaged(root, manifest, f"{path} is damaged: its sha256 differs from the one the manifest records")


def check_part(root: Path, part: Part, manifest: dict[str, Any], *, checksum: bool = True) -> None:
    """Both files of a part: its profiles and its moments."""
    for name, record in part.records.items():
        check_file(root, name, record, manifest, checksum=checksum)


def check_part_rows(root: Path, part: Part, table: pa.Table, manifest: dict[str, Any]) -> None:
    """The rows read from a part are exactly its samples, in order."""
    ids = table.column("sample_id").to_numpy()
    if len(ids) != part.rows or not np.array_equal(ids, np.arange(part.start, part.stop)):
        raise _damaged(root, manifest, f"{root / part.file} holds {len(ids)} rows with ids "
                                       f"{_span(ids)} where part {part.index} must hold samples "
                                       f"{part.start}..{part.stop - 1}")


def stray_files(root: Path, manifest: dict[str, Any]) -> list[Path]:
    """Part files no manifest lists and no job of this run could be writing.

    While a run is unfinished, the file of a part it lacks may exist unlisted:
    a job wrote it and was stopped before listing it, and a resume rewrites
    it. Anything else under ``profiles/`` or ``stats/`` named ``part-*`` is a
    stranger (a copy from another run, say) that a folder reader such as
    ``pd.read_parquet("RUN/profiles")`` would mix in.
    """
    listed = {p.index for p in parts_of(manifest)}
    expected = range(part_count(manifest))
    strays = []
    for folder in (PROFILES_DIR, PART_STATS_DIR):
        for path in sorted((root / folder).glob("part-*")):
            index = _index_of(path)
            writable = index is not None and index in expected and not manifest["complete"]
            if index not in listed and not writable:
                strays.append(path)
    return strays


def temporaries(root: Path) -> list[Path]:
    """Temporary files of jobs killed while writing (readers never look at them)."""
    return sorted(p for folder in (root, root / PROFILES_DIR, root / PART_STATS_DIR) if folder.is_dir()
                  for p in folder.iterdir() if is_temporary(p))


def check_no_strays(root: Path, manifest: dict[str, Any]) -> None:
    strays = stray_files(root, manifest)
    if strays:
        raise _damaged(root, manifest, f"{strays[0]} is not listed in the manifest (a file from elsewhere; "
                                       f"folder readers would mix its rows in)", fix="delete it, or ")


def verify_run(root: str | Path) -> list[str]:
    """Every problem of a run directory, one line each (empty when the run is sound).

    Checks the manifest, the size and sha256 of every listed file, each
    part's rows and ids, and files no manifest lists.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ParamsalError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{root} is not a paramsal run directory (no manifest.json)"]
    problems = []
    for name, record in manifest["files"].items():
        problems += _problems(check_file, root, name, record, manifest)
    for part in parts_of(manifest):
        found = _problems(check_part, root, part, manifest)
        if not found:
            found = _problems(lambda part=part: check_part_rows(
                root, part, pq.read_table(root / part.file, columns=["sample_id"]), manifest))
        problems += found
    problems += [f"{path} is not listed in the manifest" for path in stray_files(root, manifest)]
    return problems


def _problems(check, *args) -> list[str]:
    """``check(*args)``'s complaint as a list of one line, or an empty list."""
    try:
        check(*args)
    except RunCorruptError as exc:
        return [str(exc)]
    except (OSError, pa.ArrowException) as exc:
        return [f"could not read a file of the run: {exc}"]
    return []


def _damaged(root: Path, manifest: dict[str, Any], problem: str, fix: str = "") -> RunCorruptError:
    return RunCorruptError(f"{problem}; {fix}{repair_hint(root, manifest)} to profile the damaged parts' "
                           f"samples again (`paramsal verify {root}` lists every problem)", problem)


def _index_of(path: Path) -> int | None:
    stem = path.name.removeprefix("part-").removesuffix(".parquet")
    return int(stem) if stem.isdigit() and path.name.endswith(".parquet") else None


def _span(ids: np.ndarray) -> str:
    return f"{int(ids.min())}..{int(ids.max())}" if len(ids) else "(none)"
