"""One writer per run directory: an advisory ``flock`` that the kernel releases when the holder dies.

Two jobs writing one run directory would interleave their parts and leave a
manifest that describes neither. The writer holds an exclusive ``flock`` on
``RUN/lock`` for as long as it writes; a second writer fails at once, naming
the holder. A killed job (SIGKILL included) leaves no stale lock: the kernel
drops the lock with the process, and the file's contents (pid, host, start
time) are only a description for messages.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from paramsal.errors import RunLockedError

LOCK = "lock"
#: Held for the moment a rank lists a finished part: ranks of one job share the manifest.
MANIFEST_LOCK = "manifest.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """Holds ``RUN/lock`` exclusively while a job writes the run; use as a context manager."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunLockedError` naming the job that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is being written by another job ({holder}); two writers would mix "
                    "their rows: wait for it to finish, stop it, or write to another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
                 .encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
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
    fd = os.open(Path(root) / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that has not described itself yet"
