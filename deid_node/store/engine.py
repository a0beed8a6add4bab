"""The database engines under the store: SQLite (embedded, the default) and PostgreSQL (several
node replicas sharing one database).

The store's SQL is written once, in SQLite's dialect. `PostgresEngine` runs it through
`to_postgres`, which rewrites the few constructs the two spell differently (placeholders,
INSERT OR IGNORE, `IS` between values, json_extract, RETURNING for new ids); the handful of
statements only PostgreSQL needs (row locks, SKIP LOCKED, advisory locks) ask the engine for
them (`for_update`, `skip_locked`, `lock_key`). The schema is the SQLite migrations': PostgreSQL
gets the same tables, columns and indexes, derived from them (`pg_schema_statements`).
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlite_utils

from deid_node.errors import DeidNodeError
from deid_node.store.schema import DATA_MIGRATIONS, MIGRATIONS, PG_SCHEMA_STEPS, migrate


class StoreUnavailableError(DeidNodeError):
    """The database cannot be reached (PostgreSQL restarting, network down): try again later.
    The SCP answers 0xA700 (out of resources) meanwhile; loops retry by themselves."""


class SqliteEngine:
    """The embedded database: one file, WAL, synchronous=FULL; one writer at a time."""

    dialect = "sqlite"

    def __init__(
        self, path: Path, *, readonly: bool = False, lock: threading.RLock | None = None
    ) -> None:
        self.path = path
        # The store's own lock: its in-memory state and its transactions under one lock, so
        # that neither waits for the other in the opposite order.
        self._lock = lock or threading.RLock()
        if readonly:
            self._conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
        else:
            new = not path.exists()
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            if new:
                path.chmod(0o600)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(self._conn)

    def for_update(self) -> str:
        return ""  # BEGIN IMMEDIATE: the writer holds the whole database

    def skip_locked(self) -> str:
        return ""

    def lock_key(self, conn: Any, key: str) -> None:
        """Serialise transactions about `key` across processes: SQLite already does."""

    @contextmanager
    def transaction(self, *, power_safe: bool = True) -> Iterator[Any]:
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

    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        with self.transaction() as conn:
            migrate(conn, self.db)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresEngine:
    """PostgreSQL through psycopg 3 and a connection pool. Transactions of one process run one
    at a time (as on SQLite: the store's read-then-write steps stay atomic within a replica);
    between replicas, row locks, SKIP LOCKED claims and advisory locks keep them apart."""

    dialect = "postgresql"
    # While the server is unreachable, a transaction fails at once for this long after a
    # failed try instead of waiting for a connection again: the SCP answers 0xA700 quickly,
    # long before the modality's DIMSE timeout, however many threads want the database.
    RETRY_AFTER_SECONDS = 1.0
    # How long one try waits for a connection (an established one is reused: no wait).
    CONNECT_WAIT_SECONDS = 3.0

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        connect_timeout: float = 10.0,
        lock: threading.RLock | None = None,
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
        self._lock = lock or threading.RLock()  # see SqliteEngine
        self._down_until = 0.0
        # The pool reports each failed reconnection; the store reports the outage itself
        # (StoreUnavailableError, in JSON log lines), once per operation that failed.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self.readonly = readonly
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=2,
            open=False,
            timeout=connect_timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
            check=ConnectionPool.check_connection,
            name="deid-node",
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout)
        except self._errors as exc:
            self.pool.close()
            # The URL holds no password (it comes from PGPASSWORD or ~/.pgpass): safe to name.
            raise StoreUnavailableError(
                f"store.url: cannot connect to PostgreSQL ({type(exc).__name__})"
            ) from None

    def for_update(self) -> str:
        return " FOR UPDATE"

    def skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def lock_key(self, conn: Any, key: str) -> None:
        """A transaction-scoped advisory lock on `key` (e.g. a series): replicas receiving
        instances of one series add them to one batch, one after the other."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))

    @contextmanager
    def transaction(self, *, power_safe: bool = True) -> Iterator[Any]:
        """One transaction (PostgreSQL commits durably: synchronous_commit is the server's)."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise StoreUnavailableError("PostgreSQL unavailable (retrying shortly)")
            try:
                with self.pool.connection(timeout=self.CONNECT_WAIT_SECONDS) as conn:
                    if self.readonly:
                        conn.read_only = True
                    with conn.transaction():
                        yield PgConnection(conn)
            except self._errors as exc:
                self._down_until = time.monotonic() + self.RETRY_AFTER_SECONDS
                raise StoreUnavailableError(
                    f"PostgreSQL unavailable ({type(exc).__name__})"
                ) from None
            self._down_until = 0.0

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self.transaction() as conn:
            cursor = conn.execute(sql, params)
            if cursor.description is None:
                return []
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def schema_version(self) -> int:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> None:
        """Bring the database to the schema of the SQLite migrations (tables, columns, indexes
        missing are created), under an advisory lock: replicas starting together upgrade once.
        Data migrations written for old SQLite files (absolute paths, ...) have nothing to do
        on a database that started with this version; those in DATA_MIGRATIONS run here too."""
        with self.transaction() as conn:
            current = self._schema_version(conn)
            if current == len(MIGRATIONS):
                return
            for statement in pg_schema_statements():
                conn.raw(statement)
            for number, statements in PG_SCHEMA_STEPS.items():
                if current < number:
                    for statement in statements:
                        conn.raw(statement)
            steps = [step for number, step in DATA_MIGRATIONS.items() if current < number]
            if not steps:
                self._set_schema_version(conn)
                return
        # The schema's statements hold their tables' locks (ALTER TABLE: ACCESS EXCLUSIVE, even
        # when the column exists) until they commit: the data steps, which read every series'
        # summary of a long history (seconds), run after, in a transaction of their own that
        # holds only the migration's lock, so that other replicas' receipts and forwarding are
        # not held up meanwhile. The version moves only once they are done (a replica starting
        # meanwhile waits for the migration's lock, then finds it done).
        with self.transaction() as conn:
            if self._schema_version(conn) == len(MIGRATIONS):
                return
            for step in steps:
                step(conn)
            self._set_schema_version(conn)

    @staticmethod
    def _schema_version(conn: PgConnection) -> int:
        """The database's schema version, under the migration's advisory lock (held until the
        transaction ends): replicas starting together upgrade once."""
        conn.execute("SELECT pg_advisory_xact_lock(7248137311)")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = int(row[0] or 0)
        if current > len(MIGRATIONS):
            raise DeidNodeError(
                f"store.url: schema version {current}, this deid-node knows"
                f" {len(MIGRATIONS)}: a newer version upgraded the database"
            )
        return current

    @staticmethod
    def _set_schema_version(conn: PgConnection) -> None:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))

    def close(self) -> None:
        self.pool.close()


class PgConnection:
    """The part of sqlite3.Connection the store uses, on a psycopg connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple | dict = ()) -> PgCursor:
        text, values, returning = to_postgres(sql)
        cursor = self._conn.execute(text, _bind(values, params))
        return PgCursor(cursor, returning)

    def executemany(self, sql: str, rows: Any) -> None:
        text, values, _ = to_postgres(sql)
        with self._conn.cursor() as cursor:
            cursor.executemany(text, [_bind(values, row) for row in rows])

    def raw(self, sql: str) -> None:
        """A statement in PostgreSQL's own dialect, without parameters (DDL)."""
        self._conn.execute(sql.replace("%", "%%"))


class PgCursor:
    def __init__(self, cursor: Any, returning: bool) -> None:
        self._cursor = cursor
        self.lastrowid: int | None = None
        self._first: tuple | None = None
        if returning:
            self._first = _plain(cursor.fetchone())
            self.lastrowid = self._first[0] if self._first else None

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> tuple | None:
        return _plain(self._cursor.fetchone())

    def fetchall(self) -> list[tuple]:
        return [_plain(row) for row in self._cursor.fetchall()]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.fetchall())


def _plain(row: tuple | None) -> tuple | None:
    """SUM() and friends come back as Decimal from PostgreSQL, int or float from SQLite."""
    if row is None:
        return None
    return tuple(
        (int(v) if v == v.to_integral_value() else float(v)) if isinstance(v, Decimal) else v
        for v in row
    )


def _bind(numbered: bool, params: Any) -> Any:
    if not numbered:
        return tuple(params) if not isinstance(params, dict) else params
    return {f"p{index}": value for index, value in enumerate(params, start=1)}


# Tables whose rows have an integer `id`: an INSERT returns it (sqlite3's lastrowid).
_ID_TABLES = frozenset(
    (
        "batches",
        "instances",
        "deliveries",
        "refused",
        "audit",
        "pull_jobs",
        "pull_lines",
        "pull_studies",
        "health_probe",
    )
)
_JSON_FALSE = re.compile(r"json_extract\(([\w.]+), '\$\.([\w.]+)'\) = 0")
_JSON = re.compile(r"json_extract\(([\w.]+), '\$\.([\w.]+)'\)")
_IS_VALUE = re.compile(r"\bIS\s+(?!NULL\b|NOT\b)", re.IGNORECASE)
_NUMBERED = re.compile(r"\?(\d+)")
# A column named like a PostgreSQL reserved word (audit.user): quoted there.
_RESERVED = re.compile(r"(?<![\w.\"'])(user)(?![\w\"'])")
_INSERT = re.compile(r"^\s*INSERT\s+(?:OR\s+IGNORE\s+)?INTO\s+(\w+)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def to_postgres(sql: str) -> tuple[str, bool, bool]:
    """SQLite's dialect, as the store writes it, in PostgreSQL's: (statement, numbered
    parameters, returns the new row's id)."""
    text = sql.replace("%", "%%")
    ignore = re.search(r"\bINSERT\s+OR\s+IGNORE\b", text, re.IGNORECASE) is not None
    text = re.sub(r"\bINSERT\s+OR\s+IGNORE\b", "INSERT", text, flags=re.IGNORECASE)
    text = _JSON_FALSE.sub(
        lambda m: f"({m.group(1)}::jsonb #> '{{{m.group(2).replace('.', ',')}}}') = 'false'::jsonb",
        text,
    )
    text = _JSON.sub(
        lambda m: f"({m.group(1)}::jsonb #>> '{{{m.group(2).replace('.', ',')}}}')", text
    )
    text = _IS_VALUE.sub("IS NOT DISTINCT FROM ", text)
    text = _RESERVED.sub(r'"\1"', text)
    numbered = _NUMBERED.search(text) is not None
    text = _NUMBERED.sub(lambda m: f"%(p{m.group(1)})s", text) if numbered else text
    text = text.replace("?", "%s")
    if ignore:
        text += " ON CONFLICT DO NOTHING"
    insert = _INSERT.match(sql)
    returning = (
        insert is not None and insert.group(1) in _ID_TABLES and "RETURNING" not in text.upper()
    )
    if returning:
        text += " RETURNING id"
    return text, numbered, returning


_PG_TYPES = {
    "INTEGER": "BIGINT",
    "TEXT": "TEXT",
    "FLOAT": "DOUBLE PRECISION",
    "REAL": "DOUBLE PRECISION",
}


def pg_schema_statements() -> list[str]:
    """CREATE TABLE / ADD COLUMN / CREATE INDEX statements (all IF NOT EXISTS) giving a
    PostgreSQL database the tables, columns and indexes of the SQLite migrations."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute("BEGIN")
        migrate(conn, sqlite_utils.Database(conn))
        conn.execute("COMMIT")
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        statements: list[str] = []
        for table in tables:
            columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
            keys = [c[1] for c in sorted(columns, key=lambda c: c[5]) if c[5]]
            definitions = []
            for _cid, column, kind, notnull, default, pk in columns:
                name = f'"{column}"' if _RESERVED.fullmatch(column) else column
                pg_kind = _PG_TYPES.get((kind or "TEXT").upper(), "TEXT")
                if keys == [column] and column == "id":
                    definitions.append(f"{name} BIGINT GENERATED BY DEFAULT AS IDENTITY")
                    continue
                definition = f"{name} {pg_kind}"
                if default is not None:
                    definition += f" DEFAULT {default}"
                if notnull and not pk:
                    definition += " NOT NULL"
                definitions.append(definition)
            primary = f", PRIMARY KEY ({', '.join(keys)})" if keys else ""
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(definitions)}{primary})"
            )
            # A table created by an earlier version lacks the columns added since.
            statements += [
                f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {d}"
                for d in definitions[1:]
                if not d.endswith("IDENTITY")
            ]
            for _seq, index, unique, origin, _partial in conn.execute(
                f"PRAGMA index_list({table})"
            ).fetchall():
                if origin == "pk":
                    continue
                names = [r[2] for r in conn.execute(f"PRAGMA index_info({index})").fetchall()]
                statements.append(
                    f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {index}"
                    f" ON {table} ({', '.join(names)})"
                )
        return statements
    finally:
        conn.close()
