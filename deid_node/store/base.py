"""The database connection: opening (and creating) the node's state, transactions, queries."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from deid_node.errors import DeidNodeError
from deid_node.files import fsync_dirs
from deid_node.store.lock import DataDirLock
from deid_node.store.schema import MIGRATIONS, migrate

SUBFOLDERS = ("spool", "deid", "quarantine", "tmp")


class StoreBase:
    """Owns `data_dir`: the database, the spool (originals), deid outputs and the quarantine."""

    def __init__(self, data_dir: Path, *, readonly: bool = False, exclusive: bool = False) -> None:
        """Open (and on first use create) the node's state.

        exclusive: the node. Takes the data folder's lock before touching anything and holds it
        until close(); a second process gets DataDirInUseError and changes nothing.
        readonly: for reports and status next to a running node; creates nothing, migrates
        nothing, writes nothing.
        Neither (`retry`, tests): takes the lock only while creating and migrating, when it is
        free; next to a running node (which migrated at its start) it opens the database as is.
        """
        self.data_dir = Path(data_dir).absolute()
        self.db_path = self.data_dir / "deid-node.sqlite"
        self._lock = threading.RLock()
        self._data_dir_lock: DataDirLock | None = None
        if readonly:
            self._conn = sqlite3.connect(
                f"{self.db_path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
            self.db = sqlite_utils.Database(self._conn)
            return
        lock = DataDirLock(self.data_dir)
        if exclusive:
            lock.acquire_or_fail()
            self._data_dir_lock = lock
            owner = True
        else:
            owner = lock.acquire()
        try:
            if owner:
                self._create_folders()
            self._connect()
            if owner:
                with self.transaction() as conn:
                    migrate(conn, self.db)
            else:
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version != len(MIGRATIONS):
                    self._conn.close()
                    raise DeidNodeError(
                        f"{self.db_path}: schema version {version}, this deid-node needs"
                        f" {len(MIGRATIONS)}; the node running on it is another version"
                    )
        except BaseException:
            lock.release()
            raise
        if not exclusive:
            lock.release()

    def _create_folders(self) -> None:
        for sub in ("", *SUBFOLDERS):
            (self.data_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # The 256 spool folders exist, durably, before the first receipt: acknowledging an
        # instance then needs no fsync of a folder's parent.
        spool = self.data_dir / "spool"
        for index in range(256):
            (spool / f"{index:02x}").mkdir(mode=0o700, exist_ok=True)
        fsync_dirs([spool, self.data_dir])

    def _connect(self) -> None:
        new = not self.db_path.exists()
        self._conn = sqlite3.connect(
            self.db_path, check_same_thread=False, isolation_level=None, timeout=30
        )
        if new:
            os.chmod(self.db_path, 0o600)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(self._conn)

    # Paths in the database are relative to data_dir (POSIX form), so that a folder moved to
    # a new disk or restored from a backup keeps working.

    def relative(self, path: Path | str) -> str:
        return Path(path).absolute().relative_to(self.data_dir).as_posix()

    def absolute(self, stored: str) -> Path:
        """A path read from the database (an absolute one, from before migration 6, as is)."""
        return self.data_dir / stored

    @contextmanager
    def transaction(self, *, power_safe: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. power_safe=False: the commit survives a crash of the process
        (it is in the WAL, in the kernel's cache) but not a power loss, and costs no fsync;
        the next power-safe commit makes it durable too."""
        with self._lock:
            if not power_safe:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    # Also after a failed COMMIT (disk full): never leave the connection inside
                    # a transaction, or every later write fails until restart.
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            finally:
                if not power_safe:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._data_dir_lock is not None:
                self._data_dir_lock.release()
                self._data_dir_lock = None
