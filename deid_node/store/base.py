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

from deid_node.files import fsync_dirs
from deid_node.store.schema import migrate

SUBFOLDERS = ("spool", "deid", "quarantine", "tmp")


class StoreBase:
    """Owns `data_dir`: the database, the spool (originals), deid outputs and the quarantine."""

    def __init__(self, data_dir: Path, *, readonly: bool = False) -> None:
        """Open (and on first use create) the node's state. readonly: for reports and status
        next to a running node; creates nothing, migrates nothing, writes nothing."""
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / "deid-node.sqlite"
        self._lock = threading.RLock()
        if readonly:
            self._conn = sqlite3.connect(
                f"{self.db_path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
            self.db = sqlite_utils.Database(self._conn)
            return
        for sub in ("", *SUBFOLDERS):
            (self.data_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # The 256 spool folders exist, durably, before the first receipt: acknowledging an
        # instance then needs no fsync of a folder's parent.
        spool = self.data_dir / "spool"
        for index in range(256):
            (spool / f"{index:02x}").mkdir(mode=0o700, exist_ok=True)
        fsync_dirs([spool, self.data_dir])
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
        with self.transaction() as conn:
            migrate(conn, self.db)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full): never leave the connection inside a
                # transaction, or every later write fails until restart.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
