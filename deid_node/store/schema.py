"""The database schema: batch states, the migrations that build and evolve it, and applying them.

A migration is a function of the database, numbered by its place in MIGRATIONS; PRAGMA
user_version records how many have run. Never edit one that has shipped: add the next.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import sqlite_utils

BATCH_STATES = (
    "receiving",
    "complete",
    "processing",
    "forwarding",
    "forwarded",
    "rejected",
    "failed",
)
FINAL_STATES = ("forwarded", "rejected", "failed")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _migration_1(db: sqlite_utils.Database) -> None:
    db["series"].create({"series_uid": str, "study_uid": str, "created_at": str}, pk="series_uid")
    db["batches"].create(
        {
            "id": int,
            "series_uid": str,
            "round": int,
            "state": str,
            "calling_ae": str,
            "created_at": str,
            "last_received_at": float,  # time.time(), for stable_seconds
            "completed_at": str,
            "processed_at": str,
            "finished_at": str,
            "passed": int,
            "summary": str,  # JSON: counts, outcome, durations; no patient values
        },
        pk="id",
        foreign_keys=[("series_uid", "series")],
    )
    db["batches"].create_index(["state"])
    db["batches"].create_index(["series_uid", "round"], unique=True)
    db["instances"].create(
        {
            "id": int,
            "batch_id": int,
            "series_uid": str,
            "study_uid": str,
            "sop_uid": str,
            "sop_class_uid": str,
            "transfer_syntax": str,
            "calling_ae": str,
            "peer": str,
            "url": str,
            "spool_path": str,
            "size": int,
            "received_at": str,
            "state": str,  # received | processed | quarantined
            "deid_path": str,
            "sop_uid_deid": str,
            "error": str,
            "report": str,  # JSON, Encord keys plus ours
        },
        pk="id",
        foreign_keys=[("batch_id", "batches")],
    )
    db["instances"].create_index(["batch_id", "sop_uid"], unique=True)
    db["instances"].create_index(["series_uid"])
    db["instances"].create_index(["study_uid"])
    db["instances"].create_index(["received_at"])
    db["deliveries"].create(
        {
            "id": int,
            "batch_id": int,
            "destination": str,
            "state": str,  # pending | done | failed
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("batch_id", "batches")],
    )
    db["deliveries"].create_index(["batch_id", "destination"], unique=True)
    db["deliveries"].create_index(["state", "next_attempt_at"])
    db["sent"].create(
        {"instance_id": int, "destination": str, "url_deid": str, "status": int, "at": str},
        pk=("instance_id", "destination"),
    )


def _migration_2(db: sqlite_utils.Database) -> None:
    db["refused"].create(
        {
            "id": int,
            "received_at": str,
            "calling_ae": str,
            "peer": str,
            "sop_uid": str,  # as the C-STORE request gave it
            "sop_class_uid": str,
            "status": int,  # the DIMSE status answered
            "reason": str,
            "quarantine_path": str,
        },
        pk="id",
    )
    db["refused"].create_index(["received_at"])


def _migration_3(db: sqlite_utils.Database) -> None:
    db["batches"].add_column("processing_attempts", int, not_null_default=0)


def _migration_4(db: sqlite_utils.Database) -> None:
    db["instances"].add_column("sha256", str)
    db["instances"].create_index(["series_uid", "sop_uid"])


def _migration_5(db: sqlite_utils.Database) -> None:
    # Instances a destination refused for good (a status retrying cannot change, or no
    # presentation context it accepts): not offered again until `deid-node retry`.
    db["dest_refused"].create(
        {"instance_id": int, "destination": str, "status": int, "reason": str, "at": str},
        pk=("instance_id", "destination"),
    )


# Where each kind of path lives under data_dir: (first folder, number of path parts from it).
_LAYOUT = {"spool": 3, "deid": 5, "quarantine": 2}  # spool/ab/x.dcm, deid/7/st/se/x.dcm


def relative_to_layout(text: str | None, folder: str) -> str | None:
    """An absolute path written by an older version, as the path under data_dir its layout
    says (whatever folder data_dir was then: it may have moved since). Anything else as is."""
    if not text or not text.startswith("/"):
        return text
    parts = PurePosixPath(text).parts
    depth = _LAYOUT[folder]
    if len(parts) > depth and parts[-depth] == folder:
        return "/".join(parts[-depth:])
    return text


def _migration_6(db: sqlite_utils.Database) -> None:
    """Paths relative to data_dir: spool, deid and quarantine paths of instances (also the
    report's `quarantine`) and the quarantine path of refused instances."""
    rows = db.execute(
        "SELECT id, spool_path, deid_path, report FROM instances"
        " WHERE spool_path LIKE '/%' OR deid_path LIKE '/%' OR report LIKE '%\"quarantine\": \"/%'"
    ).fetchall()
    for instance_id, spool_path, deid_path, text in rows:
        report = json.loads(text) if text else None
        if report and report.get("quarantine"):
            report["quarantine"] = relative_to_layout(report["quarantine"], "quarantine")
        db.execute(
            "UPDATE instances SET spool_path = ?, deid_path = ?, report = ? WHERE id = ?",
            (
                relative_to_layout(spool_path, "spool"),
                relative_to_layout(deid_path, "deid"),
                json.dumps(report) if report is not None else text,
                instance_id,
            ),
        )
    for refused_id, path in db.execute(
        "SELECT id, quarantine_path FROM refused WHERE quarantine_path LIKE '/%'"
    ).fetchall():
        db.execute(
            "UPDATE refused SET quarantine_path = ? WHERE id = ?",
            (relative_to_layout(path, "quarantine"), refused_id),
        )


def _migration_7(db: sqlite_utils.Database) -> None:
    """The console: operator actions (who, when, what, which UID) and a row /healthz rewrites
    to prove the database takes writes."""
    db["audit"].create(
        {
            "id": int,
            "at": str,
            "user": str,
            "role": str,
            "action": str,
            "target": str,
            "detail": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db["audit"].create_index(["at"], if_not_exists=True)
    db["health_probe"].create({"id": int, "at": str}, pk="id", if_not_exists=True)
    # /metrics and /quarantine count and list quarantined instances among all of them.
    db["instances"].create_index(["state"], if_not_exists=True)
    # An instance an operator released after looking at its image (console): processed again
    # without the pixel review holds.
    if "pixels_reviewed" not in db["instances"].columns_dict:
        db["instances"].add_column("pixels_reviewed", int, not_null_default=0)


def _migration_8(db: sqlite_utils.Database) -> None:
    """Pull jobs (`deid-node pull`, deid_node/pull.py): a job, its input lines (identifying:
    accession numbers, patient IDs; shown only by pull-status --detail) and the studies found."""
    db["pull_jobs"].create(
        {
            "id": int,
            "source": str,
            "state": str,  # queued, running, done, failed, cancelled
            "cancel_requested": int,
            "created_at": str,
            "updated_at": str,
            "finished_at": str,
            "error": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db["pull_lines"].create(
        {
            "id": int,
            "job_id": int,
            "line_no": int,
            "query": str,  # JSON: the C-FIND keys of this line
            "state": str,  # pending, found, not_found, failed
            "error": str,
        },
        pk="id",
        foreign_keys=[("job_id", "pull_jobs", "id")],
        if_not_exists=True,
    )
    db["pull_lines"].create_index(["job_id", "state"], if_not_exists=True)
    db["pull_studies"].create(
        {
            "id": int,
            "job_id": int,
            "line_id": int,
            "study_uid": str,
            "state": str,  # pending, retrieving, retrieved, failed, cancelled
            "expected": int,  # NumberOfStudyRelatedInstances from the C-FIND, when given
            "completed": int,
            "failed": int,
            "attempts": int,
            "next_at": str,
            "error": str,
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("job_id", "pull_jobs", "id"), ("line_id", "pull_lines", "id")],
        if_not_exists=True,
    )
    db["pull_studies"].create_index(["job_id", "state"], if_not_exists=True)


def _migration_9(db: sqlite_utils.Database) -> None:
    """Projects (issue 14): each batch and instance belongs to one project, a series is one per
    (project, SeriesInstanceUID), and a pull job feeds one project. Rows from before belong to
    the implicit project "default"; an instance no project took (unrouted) has none (NULL)."""
    for table in ("batches", "instances", "pull_jobs"):
        if "project" not in db[table].columns_dict:
            db[table].add_column("project", str)
            db.execute(f"UPDATE {table} SET project = 'default'")  # noqa: S608 - fixed names
    db.execute("DROP INDEX IF EXISTS idx_batches_series_uid_round")
    db["batches"].create_index(["project", "series_uid", "round"], unique=True, if_not_exists=True)
    db["instances"].create_index(["project", "series_uid", "sop_uid"], if_not_exists=True)


def _migration_10(db: sqlite_utils.Database) -> None:
    """Replicas (issue 18): who holds a batch being processed or a delivery being sent, and
    until when (a lease a heartbeat renews; once it expires another replica takes the work
    over); the replicas themselves; and the batches an open association of a replica holds
    back from completion."""
    for table in ("batches", "deliveries"):
        columns = db[table].columns_dict
        if "claimed_by" not in columns:
            db[table].add_column("claimed_by", str)
        if "lease_until" not in columns:
            db[table].add_column("lease_until", float)
    db["replicas"].create(
        {
            "replica_id": str,
            "host": str,
            "port": int,
            "pid": int,
            "started_at": str,
            "heartbeat_at": float,  # time.time()
        },
        pk="replica_id",
        if_not_exists=True,
    )
    db["holds"].create(
        {"replica_id": str, "association": str, "batch_id": int},
        pk=("replica_id", "association", "batch_id"),
        if_not_exists=True,
    )


def _migration_11(db: sqlite_utils.Database) -> None:
    """Receipts whose row is committed while their file's fsync still runs (issue 17): a marker
    per spool file, so that start-up checks exactly those files (store/spool.py)."""
    db["receipts_in_flight"].create(
        {"spool_path": str, "series_uid": str, "sop_uid": str},
        pk="spool_path",
        if_not_exists=True,
    )


_INSERT_PROCESSED = "INSERT INTO processed (batch_id, duration_s, ocr_seconds) VALUES (?, ?, ?)"


def processed_row(summary: dict[str, Any]) -> tuple[float | None, str | None] | None:
    """What /metrics counts of a series round's summary (its processing time, its files' OCR
    seconds histogram), as a `processed` row's (duration_s, ocr_seconds JSON); None when the
    summary has no processing time (a failure, an unrouted instance): nothing to count."""
    if "duration_s" not in summary:
        return None
    duration = summary["duration_s"]
    ocr = summary.get("ocr_seconds")
    return (
        float(duration) if isinstance(duration, int | float) else None,
        json.dumps(ocr) if isinstance(ocr, dict) else None,
    )


def record_processed(conn: Any, batch_id: int, summary: dict[str, Any]) -> None:
    """The `processed` row of a round whose summary is written in this transaction (conn: a
    sqlite3 or engine.PgConnection)."""
    row = processed_row(summary)
    if row is not None:
        conn.execute(_INSERT_PROCESSED, (batch_id, *row))


def backfill_processed(conn: Any) -> None:
    """A `processed` row for every round whose summary was written before the table existed,
    in the order of the rounds. conn: a sqlite3 or engine.PgConnection."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT id, summary FROM batches WHERE id > ? AND summary LIKE '%duration_s%'"
            " ORDER BY id LIMIT 10000",
            (last,),
        ).fetchall()
        if not rows:
            return
        new = []
        for batch_id, text in rows:
            try:
                summary = json.loads(text)
            except ValueError:
                continue
            row = processed_row(summary) if isinstance(summary, dict) else None
            if row is not None:
                new.append((batch_id, *row))
        if new:
            conn.executemany(_INSERT_PROCESSED, new)
        last = rows[-1][0]


def _migration_12(db: sqlite_utils.Database) -> None:
    """Series rounds processed, one row each, appended in the transaction that writes the
    round's summary (issue 17): /metrics adds up only the rows after the last one it counted,
    instead of parsing every summary ever written at each scrape. Backfilled from the
    summaries written before. And an index /metrics counts deliveries by (a covering one: a
    scan of it, not of the table)."""
    db["processed"].create(
        {
            "id": int,
            "batch_id": int,
            "duration_s": float,  # the summary's, None when it is not a number
            "ocr_seconds": str,  # JSON: the summary's ocr_seconds histogram, when it has one
        },
        pk="id",
        if_not_exists=True,
    )
    backfill_processed(db.conn)
    db["deliveries"].create_index(["destination", "state"], if_not_exists=True)


def _migration_13(db: sqlite_utils.Database) -> None:
    """`sent` in the order its rows were inserted, so that /metrics counts only the rows past a
    watermark (issue 17): on SQLite its rowid already is (nothing to do); PostgreSQL gets a
    column for it, PG_SCHEMA_STEPS[13]."""


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11,
    _migration_12,
    _migration_13,
]

# Schema statements only PostgreSQL needs (what SQLite has without them), by the migration's
# number, on a database older than it, after the statements derived from the migrations.
# 13: `sent.seq` numbers the rows in insert order from a sequence, as SQLite's rowid does. Added
# without a default, then given one: existing rows keep NULL (metrics_queries.sent_unordered
# counts them) instead of a rewrite of the whole table under an exclusive lock; every later
# INSERT gets a number, also from a replica still on the version before.
PG_SCHEMA_STEPS: dict[int, list[str]] = {
    13: [
        "CREATE SEQUENCE IF NOT EXISTS sent_seq AS BIGINT",
        "ALTER TABLE sent ADD COLUMN IF NOT EXISTS seq BIGINT",
        "ALTER TABLE sent ALTER COLUMN seq SET DEFAULT nextval('sent_seq')",
        "ALTER SEQUENCE sent_seq OWNED BY sent.seq",
        "CREATE INDEX IF NOT EXISTS idx_sent_seq ON sent (seq)",
    ]
}

# Data migrations PostgreSQL runs too (its schema is derived from the SQLite migrations, see
# engine.PostgresEngine.migrate): by the migration's number, on a database older than it.
DATA_MIGRATIONS: dict[int, Callable[[Any], None]] = {12: backfill_processed}


def migrate(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """Run the migrations this database has not had yet (inside the caller's transaction)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        migration(db)
        conn.execute(f"PRAGMA user_version={number}")
