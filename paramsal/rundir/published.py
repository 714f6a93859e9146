"""Sets of files that mean something only together (a saved result, a report), published as one.

Each file is written durably under its own name, then a small JSON record
naming every file with its size and sha256 is written last. A reader trusts
the set only when each file matches the record: a job killed while it
replaced a result leaves new tables beside an old figure, and the record
(old or missing) no longer matches them, so the set reads as unfinished
instead of as a mixture. The record also says which run the files were made
from (:func:`paramsal.rundir.manifest.run_identity`), and it is what lets
``--overwrite`` delete exactly the files paramsal published, and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from paramsal._io import atomic_path, file_record, is_temporary, writable_folder
from paramsal.errors import InputError
from paramsal.rundir.ownership import MANIFEST, claim, entries, is_regular, linked, read_json, remove

#: The record formats: a saved result (``NAME.json``) and a report (``report.json``). Version 1 results recorded
#: no files: theirs are known by name (:func:`_files_of`).
RESULT_FORMAT = "paramsal-result/2"
REPORT_FORMAT = "paramsal-report/1"
_OLD_RESULT_FORMAT = "paramsal-result/1"
_FORMATS = (RESULT_FORMAT, REPORT_FORMAT, _OLD_RESULT_FORMAT)
#: A published file's name: plain, in the record's own folder.
_PLAIN = re.compile(r"[A-Za-z0-9_.=+,-]+")
#: Largest record read (a record lists a few files and a config).
_RECORD_BYTES = 16 << 20

#: Writes one file at the temporary path it is given (its return value is ignored).
Writer = Callable[[Path], object]


class Unpublished(InputError):
    """A set of files whose record is missing, foreign, or does not match them (a save that was interrupted)."""


def owned_folder(folder: str | os.PathLike, option: str) -> Path:
    """``folder``, created if needed, after checking paramsal may publish there: a run's own folder, or a folder
    that is new, empty or already holds records of paramsal's.

    Raises:
        InputError: a non-empty folder of someone else's, or one that cannot be written.
        RunCorruptError: inside a run, the folder is a symbolic link.
    """
    folder = Path(folder)
    run = folder.parent
    if is_regular(run / MANIFEST):
        if folder.is_symlink():
            raise linked(run, folder)
    else:
        listed = _listed_names(folder) if folder.is_dir() else set()
        claim(folder, option, own=lambda path: path.name in listed)
    return writable_folder(folder, option)


def publish(folder: Path, record: str, writers: Mapping[str, Writer], content: dict[str, Any]) -> dict[str, Path]:
    """Writes each file (``writers[name](temporary path)``), then the record ``record`` listing them, last.

    Files an earlier record of the same name listed and this one does not are
    removed once the new record is in place.

    Args:
        folder: where the files go (checked by :func:`owned_folder`).
        record: the record's file name ("pruning.json").
        writers: each file's name and the function that writes it.
        content: what else the record holds (its format, the run's identity, a config).

    Returns:
        Every file's path by name, the record's included.
    """
    before = _files_of(folder, record)
    files = {}
    for name, write in writers.items():
        if not is_plain(name):
            raise ValueError(f"{name!r} is not a plain file name")  # names are paramsal's own: a bug if so
        with atomic_path(folder / name) as tmp:
            write(tmp)
            files[name] = file_record(tmp)
    with atomic_path(folder / record) as tmp:
        tmp.write_text(json.dumps({**content, "files": files}, indent=1, default=_plain))
    for name in sorted(before - set(files)):
        remove(folder, name)
    return {name: folder / name for name in [*files, record]}


def is_plain(name: object) -> bool:
    """A file name paramsal could have published: no folder, no link, nothing but plain characters."""
    return isinstance(name, str) and bool(_PLAIN.fullmatch(name)) and name not in (".", "..")


def read_record(folder: Path, record: str, formats: tuple[str, ...]) -> dict[str, Any]:
    """A record of one of ``formats``, after checking every file it lists is the one it lists.

    Raises:
        Unpublished: naming the record or the first file that does not match.
    """
    path = folder / record
    try:
        content = read_json(path, _RECORD_BYTES)
    except ValueError as exc:
        raise Unpublished(f"{path} {exc}: it is not a record paramsal saved") from None
    if not isinstance(content, dict) or content.get("format") not in formats:
        raise Unpublished(f"{path} is not a record paramsal saved (format {' or '.join(formats)})")
    listed = content.get("files")
    if content["format"] == _OLD_RESULT_FORMAT:
        return content
    if not isinstance(listed, dict) or not all(map(is_plain, listed)):
        raise Unpublished(f"{path} lists no files in the form paramsal writes them")
    for name, expected in listed.items():
        found = file_record(folder / name) if is_regular(folder / name) else None
        if found is None or not isinstance(expected, dict) or \
                (found["bytes"], found["sha256"]) != (expected.get("bytes"), expected.get("sha256")):
            raise Unpublished(f"{folder / name} is not the file {path} lists (a save was interrupted, or the file "
                              "was changed since): save the result again")
    return content


def records_in(folder: Path, formats: tuple[str, ...]) -> list[str]:
    """The names of the records of ``formats`` in ``folder``, sorted (unreadable JSON files are not records)."""
    names = []
    for path in entries(folder) if folder.is_dir() and not folder.is_symlink() else []:
        if path.suffix == ".json" and is_regular(path):
            try:
                content = read_json(path, _RECORD_BYTES)
            except ValueError:
                continue
            if isinstance(content, dict) and content.get("format") in formats:
                names.append(path.name)
    return names


def unpublish_all(root: Path, name: str) -> None:
    """Removes every set of files published in the run's folder ``root/name`` (its records' files, the records, and
    paramsal's temporaries there), leaving anything else."""
    folder = root / name
    entries(root, name)  # refuses a folder that is a link
    for record in records_in(folder, _FORMATS):
        for listed in sorted(_files_of(folder, record)):
            remove(root, f"{name}/{listed}")
        remove(root, f"{name}/{record}")
    for path in entries(root, name):
        if is_temporary(path):
            remove(root, f"{name}/{path.name}")


def _files_of(folder: Path, record: str) -> set[str]:
    """The files a record of paramsal's lists (none when there is no such record)."""
    try:
        content = read_json(folder / record, _RECORD_BYTES)
    except ValueError:
        return set()
    if not isinstance(content, dict) or content.get("format") not in _FORMATS:
        return set()
    if content["format"] == _OLD_RESULT_FORMAT:
        stem = record.removesuffix(".json")
        arrays = content["arrays"] if isinstance(content.get("arrays"), list) else []
        names = {f"{stem}.parquet", f"{stem}-summary.parquet", f"{stem}.png",
                 *(f"{stem}-{key}.npy" for key in arrays if isinstance(key, str))}
    else:
        names = set(content["files"]) if isinstance(content.get("files"), dict) else set()
    return {n for n in names if is_plain(n) and n != record}


def _listed_names(folder: Path) -> set[str]:
    """The records of paramsal's in ``folder`` and every file they list."""
    names = set()
    for record in records_in(folder, _FORMATS):
        names |= {record, *_files_of(folder, record)}
    return names


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays in a config."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = ["REPORT_FORMAT", "RESULT_FORMAT", "Unpublished", "Writer", "is_plain", "owned_folder", "publish",
           "read_record", "records_in", "unpublish_all"]
