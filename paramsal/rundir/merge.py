"""One run from several directories that each profiled some parts of it: machines without a shared filesystem.

Each machine profiles its share of the parts into a directory of its own
(``paramsal profile ... --shard I/N``, or a torchrun job per machine); the
directories are then copied to one place and merged. Every part is checked
(size, sha256, rows and ids) before it is copied, and the merged run's
statistics are merged from the parts in part order, as a single job's are.

A merge is a job like a profile: it claims its output first (a manifest
naming its sources is written before any file is copied), lists each part
once copied, and a merge that was stopped (SIGKILL included) is finished by
the same command, ending with the bytes an uninterrupted merge writes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from paramsal._io import atomic_path, file_record, writable_folder
from paramsal.errors import InputError, RunCorruptError, RunMismatchError
from paramsal.rundir.integrity import check_file, check_no_links
from paramsal.rundir.layout import PART_STATS_DIR, PROFILES_DIR, UNITS
from paramsal.rundir.lock import RunLock
from paramsal.rundir.manifest import (
    FileRecord,
    Manifest,
    Part,
    new_run_id,
    read_manifest,
    storage_error,
    write_manifest,
)
from paramsal.rundir.matching import NUMERIC_CONFIG, config_mismatches, mismatch_details
from paramsal.rundir.ownership import MANIFEST, claim, folder, inside
from paramsal.rundir.resume import remove_temporaries
from paramsal.rundir.run import Run
from paramsal.rundir.writing import finish_run, now

OUT_OPTION = "out"


def merge_runs(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> Run:
    """Merges runs of one model, data set and config that hold different parts into ``out``.

    Args:
        sources: run directories made by jobs of the same run (same identity
            and numeric config; each part may be in several, with the same sha256).
        out: a new or empty directory (not one of the sources), or the output
            of a merge of the same sources that was stopped: it is finished.

    Returns:
        The merged run; complete when the sources hold every part between them.

    Raises:
        RunMismatchError: sources of different runs, or a part that differs between two sources.
        RunCorruptError: a source's part does not match its manifest.
        InputError: ``out`` is not empty and holds no merge of these sources.
    """
    if not sources:
        raise InputError("merge needs at least one run directory")
    runs = [Run(source) for source in sources]
    root = Path(out)
    if any(root.resolve() == run.path.resolve() for run in runs):
        raise InputError(f"{root} already holds a run (it is one of the sources): merge into a new or empty directory")
    first = runs[0]
    for run in runs[1:]:
        _check_compatible(first, run)
    chosen = _parts_by_index(runs)
    origin = [str(run.path.resolve()) for run in runs]
    holds_run = claim(root, OUT_OPTION)
    writable_folder(root, OUT_OPTION)
    with RunLock(root):
        check_no_links(root)
        manifest = _continued(root, origin) if holds_run else None
        remove_temporaries(root)
        if manifest is None:
            manifest = _started(root, first, runs, origin)
        _units_whole(root, manifest)
        for name in (PROFILES_DIR, PART_STATS_DIR):
            folder(root, name, create=True)
        listed = {part.index for part in _sound_parts(root, manifest)}
        for index in sorted(set(chosen) - listed):
            run, part = chosen[index]
            for name, record in part.records.items():
                _copy(run.path, root, name, record)
            manifest.list_part(part)
            manifest.updated = now()
            write_manifest(root, manifest)
        finish_run(root)
    return Run(root)


def _started(root: Path, first: Run, runs: list[Run], origin: list[str]) -> Manifest:
    """A new merge's manifest, written (with its units) before any part is copied."""
    merged_from = [*(first.manifest.merged_from or []), *(str(run.path.resolve()) for run in runs)]
    manifest = dataclasses.replace(first.manifest, run_id=new_run_id(), complete=False, updated=now(), parts=[],
                                   files={}, merged_from=merged_from, merge_of=origin)

    def list_units(record: FileRecord) -> None:
        manifest.files[UNITS] = record
        write_manifest(root, manifest)

    _copy(first.path, root, UNITS, first.manifest.files[UNITS], listed=list_units)
    return manifest


def _continued(root: Path, origin: list[str]) -> Manifest:
    """The manifest of the stopped merge of the same sources that ``root`` holds, with its units made whole.

    Raises:
        InputError: ``root`` holds another run (a profile, or a merge of other sources).
    """
    manifest = read_manifest(root)
    if manifest is None or manifest.merge_of != origin:
        raise InputError(f"{root} already holds a run that is not a merge of these sources: merge into a new or "
                         "empty directory")
    return manifest


def _sound_parts(root: Path, manifest: Manifest) -> list[Part]:
    """The parts a stopped merge listed whose files are whole; the others are dropped, to be copied again."""
    sound = []
    for part in manifest.listed:
        try:
            for name, record in part.records.items():
                check_file(root, name, record, manifest)
        except RunCorruptError:
            continue
        sound.append(part)
    if len(sound) < len(manifest.parts):
        manifest.parts = sound
        write_manifest(root, manifest)
    return sound


def _units_whole(root: Path, manifest: Manifest) -> None:
    """Copies the units again from the first source when a stopped merge listed them but was killed before they took
    their name."""
    try:
        check_file(root, UNITS, manifest.files[UNITS], manifest)
    except RunCorruptError:
        _copy(Path((manifest.merge_of or [])[0]), root, UNITS, manifest.files[UNITS])


def _check_compatible(first: Run, other: Run) -> None:
    details = mismatch_details(other.manifest, first.manifest, (str(other.path), str(first.path)))
    differ = config_mismatches(first.manifest, other.manifest) + [
        key for key in ("batches_per_part",) if getattr(first.manifest.config, key) != getattr(other.manifest.config,
                                                                                                  key)]
    if details:
        raise RunMismatchError(f"{other.path} and {first.path} are not shares of one run: the first was made with "
                               f"{details}; merge only directories profiled with the same model, data, units and "
                               "settings")
    if differ:
        raise RunMismatchError(f"{other.path} was profiled with another {', '.join(differ)} than {first.path} "
                               f"(one of {', '.join(NUMERIC_CONFIG)} or the part size): their parts do not make "
                               "one run")


def _parts_by_index(runs: list[Run]) -> dict[int, tuple[Run, Part]]:
    """Each part index with the run it is taken from; a part held twice must be the same file."""
    chosen: dict[int, tuple[Run, Part]] = {}
    for run in runs:
        for part in run.manifest.listed:
            if part.index in chosen:
                held_by, held = chosen[part.index]
                if (held.sha256, held.stats_sha256) != (part.sha256, part.stats_sha256):
                    raise RunMismatchError(f"part {part.index} differs between {held_by.path} and {run.path} "
                                           "(another sha256): they are not parts of one run")
                continue
            chosen[part.index] = (run, part)
    return chosen


def _copy(source: Path, root: Path, name: str, expected: FileRecord,
          listed: Callable[[FileRecord], None] | None = None) -> FileRecord:
    """Copies one file durably, checked against the record (size, sha256) of the source's manifest; ``listed`` is
    called with the record before the copy takes its name."""
    target = inside(root, name)
    try:
        with atomic_path(target) as tmp:
            shutil.copyfile(inside(source, name), tmp)
            record = FileRecord.from_json(file_record(tmp))
            if (record.bytes, record.sha256) != (expected.bytes, expected.sha256):
                raise RunCorruptError(f"{source / name} is not the file {source / MANIFEST} lists (size or sha256 "
                                      f"differ): run `paramsal verify {source}`, repair it, then merge again")
            if listed is not None:
                listed(record)
    except OSError as exc:
        raise storage_error(target, exc) from exc
    return record


__all__ = ["merge_runs"]
