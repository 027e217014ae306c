"""One run per run directory: an advisory lock on ``<run_dir>/.lock``.

Two trainings on one directory would interleave their checkpoints and rewrite each other's
``metrics.jsonl`` (one appending to a file the other has replaced), losing records without a
word. The trainer therefore takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lock``
before it writes anything to the directory and holds it until the run ends. The kernel drops a
flock when its holder dies, so a run killed with SIGKILL leaves no stale lock: the file stays,
the lock does not, and ``--resume`` takes it again. The holder's pid is written into the file so
the refusal can name it. Under torchrun only rank 0 writes, so rank 0 alone holds the lock.
"""
from __future__ import annotations

import fcntl
import os

from selectivity.errors import TrainingError, WriteError

LOCK_NAME = ".lock"


class RunLock:
    """Held from ``acquire()`` to ``release()`` (or the process's end)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise TrainingError naming the pid that holds it."""
        if self._fd is not None:
            return self
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}; fix permissions of "
                             f"{self.run_dir} or choose another --out-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "another process"
            raise TrainingError(f"run directory {self.run_dir} is in use by {who}; wait for that "
                                f"run to end (or stop it), or choose another --name") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the lock is what protects the directory; the pid is only for the message
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holder_pid(fd: int) -> int | None:
    """The pid written into a lock file, or None if unreadable."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
