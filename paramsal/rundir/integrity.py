"""Checks that a run directory's files are the ones its manifest lists: sizes, checksums, schemas, rows, ids, strays.

Readers check each file they open (:func:`check_file`, :func:`check_schema`,
:func:`check_part_rows`); ``paramsal verify RUN`` (:func:`verify_run`) checks
everything at once and lists every problem with the way to repair it. No
check follows a symbolic link: a link in a run is itself a problem, and the
file it points to is never opened, measured or named by its size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paramsal._io import file_record, is_temporary
from paramsal.errors import ParamsalError, RunCorruptError, RunLockedError, first_line
from paramsal.rundir.layout import PART_STATS_DIR, PROFILES_DIR, STATS, TAILS_DIR, UNITS, part_index
from paramsal.rundir.lock import writer_of
from paramsal.rundir.manifest import FileRecord, Manifest, Part, read_manifest
from paramsal.rundir.matching import repair_hint
from paramsal.rundir.ownership import RUN_FOLDERS, entries, inside, linked

#: The columns of a part file besides its vectors, and their Arrow types.
PART_COLUMNS = {"sample_id": pa.int64(), "target": pa.int64(), "pred": pa.int64(), "loss": pa.float32(),
                "target_prob": pa.float32(), "pred_prob": pa.float32(), "correct": pa.bool_(),
                "nonfinite": pa.bool_(), "nonfinite_param": pa.string()}
#: The columns a run of task "answer" adds to its part files (:meth:`paramsal.zoo.qa.QADataset.sample_columns`):
#: the question's prompt, the greedy answer's text, the reference answer, the reference's log-probability and the
#: question's category.
ANSWER_COLUMNS = {"prompt": pa.string(), "answer": pa.string(), "reference": pa.string(),
                  "answer_logprob": pa.float32(), "label": pa.string()}
#: The columns of ``units.parquet`` and of a moments file (``stats.parquet``, ``stats/part-*.parquet``).
UNITS_COLUMNS = {"unit_id": pa.int64(), "param": pa.string(), "module": pa.string(), "layer": pa.int32(),
                 "channel": pa.int64(), "size": pa.int64()}
MOMENTS_COLUMNS = {"unit_id": pa.int64(), "count": pa.int64(), "mean": pa.float64(), "m2": pa.float64(),
                   "std": pa.float64()}


def units_table(columns: dict[str, list]) -> pa.Table:
    """``units.parquet``'s table from a unit index's columns (:meth:`paramsal.engine.units.UnitIndex.columns`)."""
    return pa.table({name: pa.array(columns[name], type=kind) for name, kind in UNITS_COLUMNS.items()})


def check_file(root: Path, name: str, record: FileRecord, manifest: Manifest, *,
               checksum: bool = True) -> None:
    """Raises :class:`RunCorruptError` unless ``root/name`` is a regular file with the recorded size (and sha256)."""
    path = inside(root, name)  # a link on the way is an error naming it; its target is never looked at
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _damaged(root, manifest, f"{path} is listed in the manifest but missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise _damaged(root, manifest, f"{path} is not a regular file")
    if info.st_size != record.bytes:
        raise _damaged(root, manifest, f"{path} has {info.st_size} bytes where the manifest records "
                                       f"{record.bytes} (truncated or overwritten)")
    if checksum and file_record(path)["sha256"] != record.sha256:
        raise _damaged(root, manifest, f"{path} is damaged: its sha256 differs from the one the manifest records")


def check_part(root: Path, part: Part, manifest: Manifest, *, checksum: bool = True) -> None:
    """Both files of a part: its profiles and its moments."""
    for name, record in part.records.items():
        check_file(root, name, record, manifest, checksum=checksum)


def sample_columns(manifest: Manifest) -> dict[str, pa.DataType]:
    """The columns of the run's sample table (a part file's, less its vectors), with their types."""
    return {**PART_COLUMNS, **(ANSWER_COLUMNS if manifest.config.task == "answer" else {})}


def expected_columns(name: str, manifest: Manifest) -> tuple[dict[str, pa.DataType], int | None]:
    """The columns a file of the run must have, with their types, and its row count where the manifest fixes it."""
    if name == UNITS:
        return UNITS_COLUMNS, manifest.num_units
    if name == STATS or name.startswith(f"{PART_STATS_DIR}/"):
        return MOMENTS_COLUMNS, manifest.num_units
    if name.startswith(f"{PROFILES_DIR}/"):
        vectors = {"profile": pa.list_(pa.float32(), manifest.num_units)}
        return {**sample_columns(manifest), **vectors}, None
    return {}, None


def check_schema(root: Path, name: str, manifest: Manifest) -> None:
    """Raises :class:`RunCorruptError` unless the Parquet file ``name`` has the columns, types and rows the run's
    format and manifest give it (its footer alone is read).

    A file whose checksum matches its manifest may still not be a file of
    this format (a foreign or hand-made run): this is what keeps its columns
    from failing later, inside an analysis.
    """
    columns, rows = expected_columns(name, manifest)
    path = inside(root, name)
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(root, manifest, f"{path} is not a Parquet file paramsal can read ({first_line(exc)})") \
            from exc
    problem = _schema_problem(schema, columns, manifest if name.startswith(f"{PROFILES_DIR}/") else None)
    if problem is None and rows is not None and metadata.num_rows != rows:
        problem = f"has {metadata.num_rows} rows where the manifest records {rows} units"
    if problem:
        raise _damaged(root, manifest, f"{path} {problem}")


def _schema_problem(schema: pa.Schema, columns: dict[str, pa.DataType], part_of: Manifest | None) -> str | None:
    for column, kind in columns.items():
        found = schema.get_all_field_indices(column)
        if len(found) != 1:
            return f"has {len(found)} {column!r} columns where the run format has one"
        actual = schema.field(found[0]).type
        if not _same_type(actual, kind):
            return f"has a {column!r} column of type {actual}, not {kind}"
    if part_of is not None and part_of.features:
        found = schema.get_all_field_indices("features")
        actual = schema.field(found[0]).type if len(found) == 1 else None
        if actual is None or not pa.types.is_fixed_size_list(actual) or actual.value_type != pa.float32():
            return "has no 'features' column of fixed-size float lists, although the manifest records features"
    return None


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types; fixed-size lists by value type and width (their item's name and nullability may differ)."""
    if pa.types.is_fixed_size_list(expected):
        return (pa.types.is_fixed_size_list(actual) and actual.value_type == expected.value_type
                and actual.list_size == expected.list_size)
    return actual == expected


def check_part_rows(root: Path, part: Part, table: pa.Table, manifest: Manifest) -> None:
    """The rows read from a part are exactly its samples, in order."""
    ids = table.column("sample_id").to_numpy()
    if len(ids) != part.rows or not np.array_equal(ids, np.arange(part.start, part.stop)):
        raise _damaged(root, manifest, f"{root / part.file} holds {len(ids)} rows with ids "
                                       f"{_span(ids)} where part {part.index} must hold samples "
                                       f"{part.start}..{part.stop - 1}")


def stray_files(root: Path, manifest: Manifest) -> list[Path]:
    """Part files no manifest lists and no job of this run could be writing.

    While a run is unfinished, the file of a part it lacks may exist unlisted:
    a job wrote it and was stopped before listing it, and a resume rewrites
    it (:meth:`~paramsal.rundir.manifest.Manifest.is_pending`). Anything else under
    ``profiles/`` or ``stats/`` named ``part-*`` is a stranger (a copy from
    another run, say) that a folder reader such as
    ``pd.read_parquet("RUN/profiles")`` would mix in.
    """
    listed = {p.index for p in manifest.parts}
    strays = []
    for folder in (PROFILES_DIR, PART_STATS_DIR):
        for path in entries(root, folder):
            index = part_index(path)
            if path.name.startswith("part-") and (index is None or not (index in listed
                                                                        or manifest.is_pending(index))):
                strays.append(path)
    return strays


def temporaries(root: Path) -> list[Path]:
    """Temporary files of jobs killed while writing, in the run and each of its folders (readers never look at
    them); folders that are links are not looked into."""
    found = []
    for name in (None, *RUN_FOLDERS):
        try:
            found += [p for p in entries(root, name) if is_temporary(p)]
        except RunCorruptError:
            continue  # a linked folder: verify names it, and nothing is done inside it
    return sorted(found)


def links(root: Path) -> list[Path]:
    """Symbolic links in the run and in its folders (none belongs in a run; none is followed)."""
    found = [p for p in entries(root) if p.is_symlink()]
    for name in RUN_FOLDERS:
        if not (root / name).is_symlink() and (root / name).is_dir():
            found += [p for p in entries(root, name) if p.is_symlink()]
    return sorted(found, key=lambda path: (len(path.parts), path))


def check_no_links(root: Path) -> None:
    """Raises for the first symbolic link in the run or its folders: a job that writes a run refuses one up front,
    rather than at whichever file it would have touched."""
    found = links(root)
    if found:
        raise linked(root, found[0])


def check_no_strays(root: Path, manifest: Manifest) -> None:
    strays = stray_files(root, manifest)
    if strays:
        raise _damaged(root, manifest, f"{strays[0]} is not listed in the manifest (a file from elsewhere; "
                                       f"folder readers would mix its rows in)", fix="delete it, or ")


def verify_run(root: str | Path) -> list[str]:
    """Every problem of a run directory, one line each (empty when the run is sound).

    Checks the manifest, the size, sha256 and schema of every listed file,
    each part's rows and ids, and lists files no manifest lists, temporary
    files of killed jobs, and symbolic links (which are never followed).
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ParamsalError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{root} is not a paramsal run directory (no manifest.json)"]
    problems = [f"{path} is a symbolic link: a run holds none, and paramsal does not follow it; remove it"
                for path in links(root)]
    for name, record in manifest.files.items():
        found = _problems(check_file, root, name, record, manifest)
        if not found and not name.startswith(f"{TAILS_DIR}/"):
            found = _problems(check_schema, root, name, manifest)
        problems += found
    for part in manifest.listed:
        found = _problems(check_part, root, part, manifest)
        for name in (part.file, part.stats_file):
            found = found or _problems(check_schema, root, name, manifest)
        if not found:
            found = _problems(lambda part=part: check_part_rows(
                root, part, pq.read_table(root / part.file, columns=["sample_id"]), manifest))
        problems += found
    problems += [f"{path} is not listed in the manifest" for path in _safely(stray_files, root, manifest)]
    problems += [f"{path} is a temporary file of a job killed while writing: the next profile of the run removes "
                 "it (readers ignore it)" for path in temporaries(root)]
    return problems


def _safely(listing, *args) -> list[Path]:
    try:
        return listing(*args)
    except RunCorruptError:
        return []  # a linked folder, named among the links


def _problems(check, *args) -> list[str]:
    """``check(*args)``'s complaint as a list of one line, or an empty list."""
    try:
        check(*args)
    except (RunCorruptError, RunLockedError) as exc:
        return [str(exc)]
    except (OSError, pa.ArrowException) as exc:
        return [f"could not read a file of the run: {exc}"]
    return []


def _damaged(root: Path, manifest: Manifest, problem: str, fix: str = "") -> ParamsalError:
    """The error for a problem a reader found: the way to repair it, unless a live job is writing the run (what a
    reader sees then changes under it; the job's own files are fine)."""
    writer = writer_of(root)
    if writer is not None:
        return RunLockedError(f"{root} is being written by another job ({writer}) and changed while it was read "
                              f"({problem}); wait for that job to finish, then read the run again")
    return RunCorruptError(f"{problem}; {fix}{repair_hint(root, manifest)} to profile the damaged parts' "
                           f"samples again (`paramsal verify {root}` lists every problem)", problem)


def _span(ids: np.ndarray) -> str:
    return f"{int(ids.min())}..{int(ids.max())}" if len(ids) else "(none)"
