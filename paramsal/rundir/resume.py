"""What a job keeps of the run it continues: the run's own manifest, and the finished parts that are sound.

A resume never rewrites what the run is (its identity and config); it
refuses another model, data set or numeric setting, checks each finished
part (size; with ``repair``, checksum, rows and ids) and its labels against
the data set's, and drops, with a note, the parts to profile again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal.errors import InputError, RunCorruptError, RunMismatchError
from paramsal.rundir.integrity import (
    check_file,
    check_no_links,
    check_no_strays,
    check_part,
    check_part_rows,
    stray_files,
    temporaries,
)
from paramsal.rundir.layout import STATS, UNITS
from paramsal.rundir.manifest import FileRecord, Manifest, Part, new_run_id, read_manifest, write_manifest
from paramsal.rundir.matching import check_same_run, config_mismatches, mismatches, resume_notes
from paramsal.rundir.ownership import MANIFEST, read_json, remove
from paramsal.rundir.writing import clear_run, write_units


def prepare_run(root: Path, planned: Manifest, units: pa.Table, labels: np.ndarray | None, *, resume: bool,
                overwrite: bool, repair: bool) -> tuple[Manifest, list[str]]:
    """The manifest this job continues (the run's own) or starts; and what it kept that the job asked otherwise.

    Args:
        planned: the manifest the job would write for a new run.
        units: the model's units table (``units.parquet``), written for a new run or where it is missing.
        labels: ``[N]`` the data set's labels by sample id, to check finished parts against; None when the data set
            does not expose them without decoding its inputs.

    The caller holds the run's lock and has claimed the folder
    (:func:`paramsal.rundir.ownership.claim`): it is new, holds only
    paramsal's leftovers, or holds a run. A run replaced (``overwrite``) loses
    exactly its own files and the results saved from it.
    """
    check_no_links(root)
    try:
        existing = read_manifest(root)
        replaced = None if existing is None else existing.to_json()
    except RunCorruptError:
        if not overwrite:
            raise
        existing, replaced = None, _damaged_manifest(root)
    if existing is not None and overwrite and (not resume or mismatches(existing, planned)
                                               or config_mismatches(existing, planned)):
        existing = None
    if existing is not None and not resume:
        raise InputError(f"{root} already holds a run; pass resume=True to continue it or overwrite=True "
                         "to start over")
    if existing is None:
        clear_run(root, replaced)
        planned.run_id, planned.files = new_run_id(), {}

        def list_units(record: FileRecord) -> None:  # the manifest exists before any file of the run does
            planned.files[UNITS] = record
            write_manifest(root, planned)

        write_units(root, units, listed=list_units)
        return planned, []
    check_same_run(root, existing, planned)
    notes = resume_notes(root, existing, planned)
    remove_temporaries(root)
    notes += _keep_sound_files(root, existing, units, repair)
    notes += _keep_sound_parts(root, existing, labels, repair)
    return existing, notes


def _damaged_manifest(root: Path) -> dict[str, Any] | None:
    """The content of a run's damaged manifest (to remove the files it lists), or None when it cannot be read."""
    try:
        return read_json(root / MANIFEST)
    except ValueError:
        return None


def _keep_sound_files(root: Path, manifest: Manifest, units: pa.Table, repair: bool) -> list[str]:
    """``units.parquet`` (rewritten from the model) and ``stats.parquet`` (merged again) when damaged and ``repair``,
    or when missing: both are derived from what the run keeps, so nothing is lost by making them again (a job killed
    while it created the run lists its units just before they take their name)."""
    notes = []
    for name, record in list(manifest.files.items()):
        try:
            check_file(root, name, record, manifest, checksum=repair)
        except RunCorruptError as exc:
            derived = name in (UNITS, STATS) and not (root / name).exists() and not (root / name).is_symlink()
            if not (repair or derived):
                raise
            notes.append(f"{exc.problem}: " + ("written again from the model" if name == UNITS else
                                                "merged again from the parts"))
            if name == UNITS:
                manifest.files[UNITS] = write_units(root, units)
            else:
                del manifest.files[name]
                manifest.complete = False
            write_manifest(root, manifest)
    return notes


def _keep_sound_parts(root: Path, manifest: Manifest, labels: np.ndarray | None, repair: bool) -> list[str]:
    """Drops from the manifest the parts to profile again; checks the kept ones against the data set's labels.

    A part whose files are gone is profiled again (with a note). With
    ``repair``, so is one whose size, checksum, rows or ids are wrong, and
    stray part files are deleted; without it, those are errors.
    """
    if not repair:
        check_no_strays(root, manifest)
    kept, notes = [], []
    for part in manifest.listed:
        problem = None
        if not all((root / name).exists() or (root / name).is_symlink() for name in (part.file, part.stats_file)):
            problem = f"part {part.index}'s files are missing"
        else:
            try:
                check_part(root, part, manifest, checksum=repair)
                _check_labels(root, part, manifest, labels)
            except RunCorruptError as exc:
                if not repair:
                    raise
                problem = exc.problem
        if problem is None:
            kept.append(part)
            continue
        notes.append(f"{problem}: profiling samples {part.start}..{part.stop - 1} again")
        for name in (part.file, part.stats_file):
            remove(root, name)
    if repair:
        for path in stray_files(root, manifest):
            notes.append(f"{path} was not listed in the manifest: removed")
            remove(root, str(path.relative_to(root)))
    if len(kept) < len(manifest.parts):
        manifest.complete = False
        manifest.files.pop(STATS, None)
        manifest.parts = kept
        write_manifest(root, manifest)
    return notes


def _check_labels(root: Path, part: Part, manifest: Manifest, labels: np.ndarray | None) -> None:
    """The rows of a finished part are the samples it claims, with the labels this data set gives them."""
    try:
        table = pq.read_table(root / part.file, columns=["sample_id", "target"])
    except (OSError, pa.ArrowException) as exc:
        raise RunCorruptError(f"{root / part.file} cannot be read ({exc})") from exc
    check_part_rows(root, part, table, manifest)
    if labels is None:
        return
    recorded = table.column("target").to_numpy()
    differ = np.flatnonzero(recorded != labels[part.start:part.stop])
    if len(differ):
        sample = part.start + int(differ[0])
        raise RunMismatchError(
            f"sample {sample} has label {int(labels[sample])} in this data set but {int(recorded[differ[0]])} "
            f"in {root} ({len(differ)} label(s) of part {part.index} differ): it is not the data set the run "
            "profiled; profile it into another directory, or start over (resume=False)")


def remove_temporaries(root: Path) -> None:
    """Temporary files of killed jobs: nobody else writes here while this job holds the lock."""
    for path in temporaries(root):
        remove(root, str(path.relative_to(root)))
