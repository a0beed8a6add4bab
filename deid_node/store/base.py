"""The database connection: opening (and creating) the node's state, transactions, queries."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deid_node.errors import DeidNodeError
from deid_node.files import fsync_dirs
from deid_node.store.engine import PostgresEngine, SqliteEngine
from deid_node.store.lock import DataDirLock
from deid_node.store.schema import MIGRATIONS

SUBFOLDERS = ("spool", "deid", "quarantine", "tmp")


class StoreBase:
    """Owns `data_dir`: the database, the spool (originals), deid outputs and the quarantine.

    With `database_url` (PostgreSQL, `[store] backend = "postgresql"`) the database is shared by
    the node's replicas and `data_dir` is the folder they share (`store.shared_dir`); each
    replica (`replica_id`) owns its lock and its tmp/ folder there.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        readonly: bool = False,
        exclusive: bool = False,
        database_url: str | None = None,
        replica_id: str = "",
    ) -> None:
        """Open (and on first use create) the node's state.

        exclusive: the node. Takes the data folder's lock (a replica's own, on a shared
        folder) before touching anything and holds it until close(); a second process gets
        DataDirInUseError and changes nothing.
        readonly: for reports and status next to a running node; creates nothing, migrates
        nothing, writes nothing.
        Neither (`retry`, tests): takes the lock only while creating and migrating, when it is
        free; next to a running node (which migrated at its start) it opens the database as is.
        """
        self.data_dir = Path(data_dir).absolute()
        self.db_path = self.data_dir / "deid-node.sqlite"
        self.shared = database_url is not None
        self.replica_id = replica_id
        # Transactions and the in-memory state of subclasses (open associations): one lock.
        self._lock = threading.RLock()
        self._data_dir_lock: DataDirLock | None = None
        self.engine: SqliteEngine | PostgresEngine
        if readonly:
            self.engine = (
                PostgresEngine(database_url, readonly=True, lock=self._lock)
                if database_url
                else SqliteEngine(self.db_path, readonly=True, lock=self._lock)
            )
            return
        lock = DataDirLock(self.data_dir, self._lock_name())
        if exclusive:
            lock.acquire_or_fail()
            self._data_dir_lock = lock
            owner = True
        else:
            owner = lock.acquire()
        try:
            if owner:
                self._create_folders()
            self.engine = (
                PostgresEngine(database_url, lock=self._lock)
                if database_url
                else SqliteEngine(self.db_path, lock=self._lock)
            )
            try:
                if owner or self.shared:
                    self.engine.migrate()
                elif self.engine.schema_version() != len(MIGRATIONS):
                    raise DeidNodeError(
                        f"{self.db_path}: schema version {self.engine.schema_version()}, this"
                        f" deid-node needs {len(MIGRATIONS)}; the node running on it is another"
                        " version"
                    )
            except BaseException:
                self.engine.close()
                raise
        except BaseException:
            lock.release()
            raise
        if not exclusive:
            lock.release()

    def _lock_name(self) -> str:
        return f"replicas/{self.replica_id}.lock" if self.shared else "deid-node.lock"

    @property
    def tmp_dir(self) -> Path:
        """Received bytes before they are adopted: a replica's own on a shared folder (its
        clean-up at start must not touch another replica's receipts in flight)."""
        if self.shared:
            return self.data_dir / "tmp" / self.replica_id
        return self.data_dir / "tmp"

    def _create_folders(self) -> None:
        for sub in ("", *SUBFOLDERS):
            (self.data_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The 256 spool folders exist, durably, before the first receipt: acknowledging an
        # instance then needs no fsync of a folder's parent.
        spool = self.data_dir / "spool"
        for index in range(256):
            (spool / f"{index:02x}").mkdir(mode=0o700, exist_ok=True)
        fsync_dirs([spool, self.data_dir])

    # Paths in the database are relative to data_dir (POSIX form), so that a folder moved to
    # a new disk or restored from a backup keeps working.

    def relative(self, path: Path | str) -> str:
        return Path(path).absolute().relative_to(self.data_dir).as_posix()

    def absolute(self, stored: str) -> Path:
        """A path read from the database (an absolute one, from before migration 6, as is)."""
        return self.data_dir / stored

    def _with_absolute_paths(self, row: dict[str, Any]) -> dict[str, Any]:
        for key in ("spool_path", "deid_path"):
            if row.get(key):
                row[key] = str(self.absolute(row[key]))
        return row

    @contextlib.contextmanager
    def transaction(self, *, power_safe: bool = True) -> Iterator[Any]:
        """One write transaction (see SqliteEngine.transaction for power_safe)."""
        with self.engine.transaction(power_safe=power_safe) as conn:
            yield conn

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        return self.engine.query(sql, params)

    def close(self) -> None:
        self.engine.close()
        if self._data_dir_lock is not None:
            self._data_dir_lock.release()
            self._data_dir_lock = None
