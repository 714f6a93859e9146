"""One run from several directories that each profiled some parts of it: machines without a shared filesystem.

Each machine profiles its share of the parts into a directory of its own
(``paramsal profile ... --shard I/N``, or a torchrun job per machine); the
directories are then copied to one place and merged. Every part is checked
(size, sha256, rows and ids) before it is copied, and the merged run's
statistics are merged from the parts in part order, as a single job's are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paramsal._io import atomic_path, file_record, writable_folder
from paramsal.engine.lock import RunLock
from paramsal.engine.manifest import (MANIFEST, NUMERIC_CONFIG, PART_STATS_DIR, PROFILES_DIR, UNITS, Part,
                                      check_same_run, config_mismatches, parts_of, storage_error, write_manifest)
from paramsal.engine.rundir import Run
from paramsal.engine.writing import finish_run, now
from paramsal.errors import InputError, RunCorruptError, RunMismatchError


def merge_runs(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> Run:
    """Merges runs of one model, data set and config that hold different parts into ``out``.

    Args:
        sources: run directories made by jobs of the same run (same identity
            and numeric config; each part may be in several, with the same sha256).
        out: a new or empty directory (not one of the sources).

    Returns:
        The merged run; complete when the sources hold every part between them.

    Raises:
        RunMismatchError: sources of different runs, or a part that differs between two sources.
        RunCorruptError: a source's part does not match its manifest.
    """
    if not sources:
        raise InputError("merge needs at least one run directory")
    runs = [Run(source) for source in sources]
    root = writable_folder(out, "--out DIR")
    if (root / MANIFEST).exists() or any(root.resolve() == run.path.resolve() for run in runs):
        raise InputError(f"{root} already holds a run: merge into a new or empty directory")
    first = runs[0]
    for run in runs[1:]:
        _check_compatible(first, run)
    chosen = _parts_by_index(runs)
    with RunLock(root):
        manifest = {**first.manifest, "complete": False, "updated": now(), "parts": [], "files": {}}
        manifest["files"][UNITS] = _copy(first.path, root, UNITS, first.manifest["files"][UNITS])
        for folder in (PROFILES_DIR, PART_STATS_DIR):
            (root / folder).mkdir(exist_ok=True)
        for index in sorted(chosen):
            run, part = chosen[index]
            for name, record in part.records.items():
                _copy(run.path, root, name, record)
            manifest["parts"].append(part.to_json())
        manifest.setdefault("merged_from", []).extend(str(run.path.resolve()) for run in runs)
        write_manifest(root, manifest)
        finish_run(root)
    return Run(root)


def _check_compatible(first: Run, other: Run) -> None:
    check_same_run(other.path, other.manifest, first.manifest)
    differ = config_mismatches(first.manifest, other.manifest) + [
        key for key in ("batches_per_part",) if first.manifest["config"][key] != other.manifest["config"][key]]
    if differ:
        raise RunMismatchError(f"{other.path} was profiled with another {', '.join(differ)} than {first.path} "
                               f"(one of {', '.join(NUMERIC_CONFIG)} or the part size): their parts do not make "
                               "one run")


def _parts_by_index(runs: list[Run]) -> dict[int, tuple[Run, Part]]:
    """Each part index with the run it is taken from; a part held twice must be the same file."""
    chosen: dict[int, tuple[Run, Part]] = {}
    for run in runs:
        for part in parts_of(run.manifest):
            if part.index in chosen:
                held_by, held = chosen[part.index]
                if (held.sha256, held.stats_sha256) != (part.sha256, part.stats_sha256):
                    raise RunMismatchError(f"part {part.index} differs between {held_by.path} and {run.path} "
                                           "(another sha256): they are not parts of one run")
                continue
            chosen[part.index] = (run, part)
    return chosen


def _copy(source: Path, root: Path, name: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Copies one file durably, checked against the record (size, sha256) of the source's manifest."""
    try:
        with atomic_path(root / name) as tmp:
            shutil.copyfile(source / name, tmp)
            record = file_record(tmp)
            if record != expected:
                raise RunCorruptError(f"{source / name} is not the file {source / MANIFEST} lists (size or sha256 "
                                      f"differ): run `paramsal verify {source}`, repair it, then merge again")
    except OSError as exc:
        raise storage_error(root / name, exc) from exc
    return dict(record)


__all__ = ["merge_runs"]
