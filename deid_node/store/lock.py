"""One process owns a data folder: an exclusive flock on `data_dir/deid-node.lock`.

Taken before anything in the folder is created, migrated or recovered, and held for the life of
the process (the kernel drops it when the process dies, kill -9 included: no stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from deid_node.errors import DataDirInUseError

LOCK_NAME = "deid-node.lock"


class DataDirLock:
    def __init__(self, data_dir: Path, name: str = LOCK_NAME) -> None:
        self.path = Path(data_dir) / name
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process (or handle) holds it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # The holder's pid, for the error a second process prints (informative only).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def acquire_or_fail(self) -> None:
        if not self.acquire():
            holder = self.holder()
            raise DataDirInUseError(
                f"node.data_dir: {self.path.parent} is in use by another deid-node process"
                f"{f' (pid {holder})' if holder else ''}; one process owns a data folder"
            )

    def holder(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
