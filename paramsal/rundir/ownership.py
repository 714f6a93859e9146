"""What paramsal may touch in a folder: only what it wrote, only where it owns the folder, never through a link.

A run directory may come from anyone (a colleague's copy, an archive, an
attacker), and ``--out`` may name any folder. Both may hold symbolic links
that lead out of them, or files that are not paramsal's. So every create,
replace and delete under a folder paramsal writes goes through this module:

* :func:`claim` takes a folder only when it is new, empty (but for
  paramsal's own leftovers: its lock, its temporaries, its empty folders) or
  already paramsal's (a run: a ``manifest.json`` in the run format; a results
  folder: saved results). ``--overwrite`` replaces a run, never anything else.
* :func:`inside` refuses a path with a symbolic link anywhere below the
  folder's root, and :func:`remove` deletes only regular files, by names the
  caller derives from a manifest or a result's record.

The user's own path *to* the root may pass through links (``--out`` is theirs
to name); below the root nothing is followed.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from paramsal._io import NOFOLLOW, is_temporary
from paramsal.errors import InputError, RunCorruptError

#: The file a writer holds (flock) while it writes a run, and the one ranks hold while they list a part.
LOCK = "lock"
MANIFEST_LOCK = "manifest.lock"
MANIFEST = "manifest.json"
#: What a lock file of paramsal's holds: nothing yet, or a description of the job that took it.
LOCK_KEYS = frozenset({"pid", "host", "since", "job"})
#: The folders paramsal makes in a run (empty ones are its own leftovers).
RUN_FOLDERS = ("profiles", "stats", "tails", "analyses", "report")
#: The probe :func:`paramsal._io.writable_folder` writes and removes.
_PROBE = re.compile(r"\.paramsal-write-test-\d+")
#: Largest lock file read when telling paramsal's from a stranger's.
_LOCK_BYTES = 4096


def linked(root: Path, path: Path) -> RunCorruptError:
    """The error for a symbolic link found where paramsal would read or write."""
    problem = f"{path} is a symbolic link"
    return RunCorruptError(f"{problem}: paramsal never follows, replaces or deletes a link inside {root}, which "
                           "could lead to files outside it; remove the link, or copy the folder without links "
                           "(cp -rL)", problem)


def inside(root: Path, name: str) -> Path:
    """``root / name``, after checking that nothing on the way below ``root`` is a symbolic link.

    Args:
        root: the folder paramsal owns.
        name: a relative name paramsal made (``profiles/part-00000.parquet``), never one read from a file.

    Raises:
        RunCorruptError: a component (the last one included) is a link, or a
            component on the way is not a folder.
    """
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or any(p in (".", "..") for p in parts):
        raise ValueError(f"{name!r} is not a plain relative name")  # names are paramsal's own: a bug if so
    path = Path(root)
    for depth, part in enumerate(parts):
        path = path / part
        mode = _mode(path)
        if mode is None:
            return Path(root, *parts)
        if stat.S_ISLNK(mode):
            raise linked(root, path)
        if depth < len(parts) - 1 and not stat.S_ISDIR(mode):
            raise RunCorruptError(f"{path} is not a folder; {root} is damaged", f"{path} is not a folder")
    return path


def folder(root: Path, name: str, *, create: bool = False) -> Path | None:
    """The real folder ``root/name`` (made when ``create``), or None when it does not exist.

    Raises:
        RunCorruptError: it is a link or a file.
    """
    path = inside(root, name)
    mode = _mode(path)
    if mode is None:
        if not create:
            return None
        path.mkdir()
        return path
    if not stat.S_ISDIR(mode):
        raise RunCorruptError(f"{path} is not a folder; {root} is damaged", f"{path} is not a folder")
    return path


def entries(root: Path, name: str | None = None) -> list[Path]:
    """What the real folder ``root/name`` (``root`` itself for None) holds, sorted; nothing is followed."""
    where = Path(root) if name is None else folder(root, name)
    return [] if where is None else sorted(where.iterdir())


def remove(root: Path, name: str) -> bool:
    """Deletes the regular file ``root/name``; returns whether there was one.

    Raises:
        RunCorruptError: it is a link, a folder or another kind of file (left as it is).
    """
    path = inside(root, name)
    mode = _mode(path)
    if mode is None:
        return False
    if not stat.S_ISREG(mode):
        raise RunCorruptError(f"{path} is not a regular file; paramsal deletes only files it wrote: move it out "
                              f"of {root}", f"{path} is not a regular file")
    path.unlink(missing_ok=True)
    return True


def is_regular(path: Path) -> bool:
    """A regular file, not reached through a link (``Path.is_file`` follows links)."""
    mode = _mode(path)
    return mode is not None and stat.S_ISREG(mode)


def read_json(path: Path, limit: int | None = None) -> Any:
    """The JSON in a regular file; else ValueError, whose text completes a sentence about the file ("is not valid
    JSON (...)", "is nested too deeply ...", "is a symbolic link", "is missing").

    ``limit`` bounds the bytes read. Python's parser recurses once per level
    of nesting: a hostile file of ``[[[[...`` raises RecursionError, turned
    into ValueError here so that every caller names the file instead.
    """
    if not is_regular(path):
        raise ValueError("is a symbolic link" if path.is_symlink() else "is not a regular file" if path.exists()
                         else "is missing")
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as file:
            raw = file.read(-1 if limit is None else limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from exc
    if limit is not None and len(raw) > limit:
        raise ValueError(f"is longer than the {limit} bytes such a file can have")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("is nested too deeply to be a file of paramsal's") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None


def is_own_lock(path: Path) -> bool:
    """A lock file paramsal wrote: a regular file with one link, empty or describing the job that took it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return False
    if info.st_size == 0:
        return True
    try:
        content = read_json(path, _LOCK_BYTES)
    except ValueError:
        return False
    return isinstance(content, dict) and set(content) <= LOCK_KEYS


def is_leftover(path: Path) -> bool:
    """Something paramsal leaves in a folder before it has made it a run: its lock, its temporaries, its probe, an
    empty folder of its own."""
    name = path.name
    if name == LOCK:
        return is_own_lock(path)
    if name == MANIFEST_LOCK or is_temporary(path) or _PROBE.fullmatch(name):
        return is_regular(path) and (name != MANIFEST_LOCK or path.lstat().st_size == 0)
    mode = _mode(path)
    return name in RUN_FOLDERS and mode is not None and stat.S_ISDIR(mode) and not any(path.iterdir())


def is_run_manifest(content: Any) -> bool:
    """Whether a manifest's content claims the run format (it may still be damaged; :mod:`manifest` checks it)."""
    return isinstance(content, dict) and isinstance(content.get("format"), str) and \
        content["format"].startswith("paramsal-run/")


def claim(root: Path, option: str, *, own: Callable[[Path], bool] | None = None) -> bool:
    """Checks that paramsal may write into ``root``; returns whether it holds a run already.

    ``root`` may be written when it does not exist, holds only paramsal's
    leftovers (:func:`is_leftover`), holds a ``manifest.json`` in the run
    format, or (with ``own``) holds what ``own`` accepts as paramsal's.

    Args:
        root: the folder (the user's path to it may pass through links).
        option: the argument that names the folder ("out_dir"), for the messages.
        own: another test of whether an entry is paramsal's (saved results, say).

    Raises:
        InputError: ``root`` is a file, or a non-empty folder that is not paramsal's.
        RunCorruptError: its ``manifest.json`` is a link.
    """
    if not root.exists():
        if root.is_symlink():
            raise InputError(f"{root} is a dangling symbolic link; name a real folder ({option}=...)")
        return False
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a folder; name a folder ({option}=...)")
    manifest = root / MANIFEST
    if manifest.is_symlink():
        raise linked(root, manifest)
    if manifest.exists():
        try:
            content = read_json(manifest)
        except ValueError as exc:
            raise InputError(f"{root}/manifest.json {exc}: paramsal cannot tell that the folder is a run of its "
                             f"own and will not write there, with or without overwrite=True; name another folder "
                             f"({option}=...), or delete this one yourself if it is a damaged run of yours") from None
        if is_run_manifest(content):
            return True
        raise InputError(f"{root} holds a manifest.json that is not a paramsal run's; paramsal writes only into a "
                         f"new or empty folder or a run of its own, with or without overwrite=True: name another "
                         f"folder ({option}=...)")
    strangers = [p for p in entries(root) if not is_leftover(p) and not (own and own(p))]
    if strangers:
        shown = ", ".join(p.name for p in strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise InputError(f"{root} is not empty ({shown}) and is not a paramsal run; paramsal writes only into a "
                         f"new or empty folder or a run of its own, with or without overwrite=True (which "
                         f"replaces only a run): name another folder ({option}=...)")
    return False


def _mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


__all__ = ["LOCK", "MANIFEST", "MANIFEST_LOCK", "RUN_FOLDERS", "claim", "entries", "folder", "inside",
           "is_leftover", "is_own_lock", "is_regular", "is_run_manifest", "linked", "read_json", "remove"]
