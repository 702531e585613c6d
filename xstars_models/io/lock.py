"""One writer per output: an exclusive lock on an output file for as long as a run writes it.

:func:`output_lock` creates ``<output>.lock`` beside the output, locks it with ``fcntl.flock``
and writes into it who holds it (process id, host name, start time in UTC). A second writer of
the same output, in this process or another, is refused at once with
:class:`~xstars_models.errors.OutputLockedError` naming the holder; it never waits.

- The kernel releases the lock when its owner exits or dies (SIGKILL included), so a lock file
  left behind by a dead process is not held: the next run takes it over.
- When the block ends, normally or by an error, the lock file is removed (if it is still this
  run's: a later owner's file is left alone), and then released.
- The lock is advisory: it holds off only the writers that take it (every command and function of
  the package that writes a scene, an ``xstars embed`` array file or an ONNX file).
- It works between the processes of one host, and between hosts only on a shared filesystem whose
  ``flock`` locks are seen by every client (NFS v4 on Linux, Lustre and BeeGFS mounted with
  ``flock``; not SMB or NFS v3 without a lock manager). Where the filesystem refuses ``flock``
  altogether (or the platform has no ``fcntl``, Windows), a warning says that the output is not
  locked and the run goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import OutputLockedError, user_stacklevel

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are written unlocked, with a warning
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "LockHolder", "lock_path", "output_lock", "read_holder"]

LOCK_SUFFIX = ".lock"
# Failures of flock that mean "this filesystem has no locks", as opposed to "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output's lock, as its lock file says.

    Attributes:
        pid: the holder's process id.
        host: the host name it runs on.
        started: when it took the lock, ISO 8601 in UTC (``2026-12-04T23:50:07Z``).
    """

    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"process {self.pid} on host {self.host} since {self.started}"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def read_holder(path: str | os.PathLike) -> LockHolder | None:
    """Who the lock file of the output ``path`` names, or ``None`` when there is none or it does
    not say (a holder that has not written it yet, a file of another program). Whether the lock is
    held is another matter: a dead holder's file names it too."""
    try:
        data = json.loads(lock_path(path).read_text())
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, field: str = "out") -> Iterator[Path]:
    """Hold the exclusive lock of the output ``path`` for the block (see the module documentation);
    yields the lock file. The output's folder is created if need be.

    Args:
        path: the output file the block writes.
        field: the argument that gives ``path``, for the error (the command line names it by its flag).

    Raises:
        OutputLockedError: (``field``) another writer holds the lock; names its process, host and
            start time.
    """
    path = Path(path)
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, lock, field)
    try:
        yield lock
    finally:
        if fd is not None:
            _release(lock, fd)


def _acquire(path: Path, lock: Path, field: str) -> int | None:
    """The open, locked descriptor of ``lock`` holding this process's details; ``None`` where the
    filesystem has no locks."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl.flock on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_of_held(path)
            who = holder.describe() if holder is not None else f"another process (its lock file {lock} is held)"
            raise OutputLockedError(
                f"{path} is being written by {who}; wait for it to finish or choose another output path.",
                field=field,
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            warnings.warn(
                f"{lock}: file locks are not available here ({err.strerror}); {path} is written "
                "without a lock, so make sure no other run writes it at the same time.",
                stacklevel=user_stacklevel(),
            )
            with contextlib.suppress(OSError):
                lock.unlink()
            return None
        # The holder we were behind may have removed its file between our open and our flock: the
        # file locked must still be the one at the path, or another run could lock a new one.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            _write_holder(fd)
            return fd
        os.close(fd)


def _write_holder(fd: int) -> None:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder_of_held(path: Path) -> LockHolder | None:
    # A holder writes its details just after taking the lock: a reader between the two finds an
    # empty file, so it looks again a few times (0.3 s at most) before naming no one.
    for _ in range(6):
        holder = read_holder(path)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def _release(lock: Path, fd: int) -> None:
    """Remove the lock file while still holding it (if the path is still ours), then release it."""
    try:
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            lock.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
