"""One writer per run directory: an advisory ``flock`` that the kernel releases when the holder dies.

Two jobs writing one run directory would interleave their parts and leave a
manifest that describes neither. The writer holds an exclusive ``flock`` on
``RUN/lock`` for as long as it writes; a second writer fails at once, naming
the holder. A killed job (SIGKILL included) leaves no stale lock: the kernel
drops the lock with the process, and the file's contents (pid, host, start
time, and a token that tells the ranks of one job the run is theirs) are
only a description.

The lock is a file inside the run, so it is opened as every file there is:
never through a symbolic link (a link would let a run directory make
paramsal truncate a file elsewhere), and never when it has other hard links.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from paramsal._io import NOFOLLOW
from paramsal.errors import RunCorruptError, RunLockedError
from paramsal.rundir.ownership import LOCK, MANIFEST_LOCK, inside, linked, read_json

#: The run directories this process holds the lock of: a reader here that finds them changing is not racing
#: another job.
_HELD: set[Path] = set()

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """Holds ``RUN/lock`` exclusively while a job writes the run; use as a context manager."""

    def __init__(self, root: Path, job: str | None = None):
        self.root = Path(root)
        self.path = self.root / LOCK
        #: Written into the lock file, so that the other ranks of a torchrun job can check they see this run.
        self.job = job
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunLockedError` naming the job that holds it.

        Raises:
            RunCorruptError: ``RUN/lock`` is a symbolic link, not a regular file, or has other hard links.
        """
        fd = _open_in_run(self.root, LOCK, os.O_RDWR | os.O_CREAT)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is being written by another job ({holder}); two writers would mix "
                    "their rows: wait for it to finish, stop it, or write to another directory") from None
        described: dict[str, object] = {"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if self.job is not None:
            described["job"] = self.job
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(described).encode())
        self._fd = fd
        _HELD.add(self.root.resolve())

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self.root.resolve())
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@contextmanager
def manifest_update(root: Path) -> Iterator[None]:
    """Waits for, then holds, the short lock under which one rank re-reads and rewrites the manifest.

    The ranks of a ``torchrun`` job write one run together (rank 0 holds
    :class:`RunLock` for all of them); each lists its finished parts in the
    shared manifest, and without this lock two ranks listing at once would
    each write a manifest missing the other's part.
    """
    fd = _open_in_run(Path(root), MANIFEST_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def writer_of(root: Path) -> str | None:
    """Who is writing ``root`` right now, when another job holds its lock (this process's own jobs aside); else None.

    The lock file is only opened for reading: a reader never creates or
    changes it (the run may be read-only).
    """
    root = Path(root)
    if fcntl is None or root.resolve() in _HELD:
        return None
    try:
        fd = os.open(inside(root, LOCK), os.O_RDONLY | NOFOLLOW)
    except (OSError, RunCorruptError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(fd)
    finally:
        os.close(fd)  # drops the shared lock, if it was taken


def job_of(root: Path) -> str | None:
    """The job token the run's lock file holds (:attr:`RunLock.job`), or None."""
    try:
        holder = read_json(inside(Path(root), LOCK), 4096)
    except (ValueError, RunCorruptError):
        return None
    return holder.get("job") if isinstance(holder, dict) else None


def _open_in_run(root: Path, name: str, flags: int) -> int:
    """A descriptor of the run's own regular file ``name``: never through a link, never a file with other links."""
    path = inside(root, name)
    try:
        fd = os.open(path, flags | NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise linked(root, path) from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        problem = f"{path} is not a regular file of its own ({info.st_nlink} hard links)"
        raise RunCorruptError(f"{problem}: paramsal writes into its lock file and will not write into another "
                              "file through it; remove it (a run needs no lock file while no job writes it)",
                              problem)
    return fd


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # a lock file is data too
        return "a job that has not described itself yet"
