"""Writing files that other processes read or that a kill may interrupt, shared by the pipeline and the trainer:
atomic replacement, replacement only when the bytes change, and an exclusive lock that dies with its process."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

_held_locks: set[int] = set()  # descriptors of the locks this process holds (not inherited by forks: see below)


def _forget_locks_after_fork() -> None:
    """A forked child (a dataloader worker) shares the lock's open file, which would keep it locked until the child
    ends too; the child closes its copy, so a lock lives exactly as long as the process that took it."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Readers see the old file or the new one, never half of one. The temp name carries the pid: two processes
    writing the same file never share (or delete) a temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_if_changed(path: Path, data: bytes | str) -> bool:
    """`atomic_write` unless the file already holds these bytes: a rerun that changes nothing leaves files (and
    their mtimes, which rsync and backups go by) as they were. Returns whether it wrote."""
    data = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


class LockedError(RuntimeError):
    """Another process holds the lock; `holder` names it (pid, host, since when)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


class ExclusiveLock:
    """An exclusive `flock` on a file: a second process asking for it is refused while the first holds it. The
    kernel drops the lock when its process ends, however it ends (SIGKILL, out of memory, a SLURM requeue), so
    nothing is left to clean up; the file stays, naming its last holder."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> ExclusiveLock:
        """Take the lock, or raise LockedError naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(self.path, holder) from None
        except OSError as error:  # a file system without flock (some NFS or Lustre mounts)
            os.close(fd)
            print(f"warning: cannot lock {self.path} ({error}); a second process on it would not be refused")
            return self
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
        self._fd = fd
        _held_locks.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _held_locks.discard(self._fd)
            os.close(self._fd)  # the last descriptor of the open file: the lock goes with it
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
