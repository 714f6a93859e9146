"""File handling shared by every part of paramsal: durable atomic writes, checksums, safe tensor loading.

A reader never sees a half-written file under its final name: the data goes
to a temporary sibling, is fsync'ed, renamed onto the final name, and the
directory is fsync'ed, so that after a crash or a power cut the final name
holds either the old file or the whole new one, never an empty or truncated
file the rename got ahead of.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from paramsal.errors import InputError

#: Temporary names start with a dot, which pandas, pyarrow and duckdb skip when they read a folder.
TMP_MARK = ".tmp-"

_HASH_BLOCK = 1 << 20


#: Flags that make ``os.open`` refuse a symbolic link as the last component (0 where the platform has none).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``, created empty; makes it ``path``, durably, only if the block succeeds.

    The temporary is created afresh (never opened through a link someone left
    under its name), and ``path`` is never a link or a folder that the rename
    would replace.

    Raises:
        InputError: ``path`` is a symbolic link or a folder.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
    _refuse_replacing(final)
    _create_empty(tmp)
    try:
        yield tmp
        _fsync(tmp)
        _refuse_replacing(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_replacing(final: Path) -> None:
    if final.is_symlink() or final.is_dir():
        raise InputError(f"{final} is a {'symbolic link' if final.is_symlink() else 'folder'}: paramsal replaces only "
                         "files it wrote; move it away")


def _create_empty(path: Path) -> None:
    """Creates ``path`` as a new empty file; a leftover of an earlier process with this pid is removed first."""
    if path.is_symlink():
        raise InputError(f"{path} is a symbolic link where paramsal writes a temporary file; remove it")
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644))


def writable_folder(folder: str | os.PathLike, option: str = "out_dir") -> Path:
    """``folder``, created if needed and checked to be writable before a job or an analysis writes into it.

    Args:
        folder: where the results go.
        option: the argument that names the folder ("out_dir"), for the message.

    Raises:
        InputError: naming the folder and ``option`` when it cannot be created or written.
    """
    folder = Path(folder)
    probe = folder / f".paramsal-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _create_empty(probe)
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}): the directory is not "
                         f"writable; name another folder ({option}=...)") from exc
    return folder


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file :func:`atomic_path` left behind (a job killed while writing)."""
    stem, mark, pid = path.name.rpartition(TMP_MARK)
    return bool(mark) and stem.startswith(".") and len(stem) > 1 and pid.isdigit()


def file_record(path: str | os.PathLike) -> dict[str, int | str]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, read in blocks (memory stays small)."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def load_tensor_file(path: str | os.PathLike, what: str) -> Any:
    """The content of a ``torch.save`` file, read with ``weights_only=True`` (tensors and plain containers only).

    Args:
        path: the file.
        what: what the file should be, with its article, for the message ("a statistics file").

    Raises:
        InputError: one line naming the file when torch refuses it. Torch's own
            message is left out on purpose: it spans many lines and advises
            ``weights_only=False``, which would run whatever code the file holds.
    """
    import torch  # only here: reading the run directory's own files needs no torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not {what} paramsal can read safely: torch.load(weights_only=True) refused it "
                         f"({type(exc).__name__}); paramsal reads plain tensors only and never unpickles other "
                         "objects, which could run code") from exc


class HashingFile(io.RawIOBase):
    """A binary file being written, and the size and sha256 of what went through it: the record of a file taken as
    it is written, instead of reading it back.

    Args:
        file: an open binary file (written through, never closed here).
    """

    def __init__(self, file: BinaryIO):
        super().__init__()
        self._file = file
        self._digest = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)  # hashlib and the write below release the GIL for large buffers
        self._file.write(view)
        self._size += len(view)
        return len(view)

    def record(self) -> dict[str, int | str]:
        """``{"bytes": size, "sha256": hex digest}`` of everything written, as :func:`file_record` gives it."""
        return {"bytes": self._size, "sha256": self._digest.hexdigest()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # and some file systems refuse fsync on directories
    finally:
        os.close(fd)
