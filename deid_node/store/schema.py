"""The database schema: batch states, the migrations that build and evolve it, and applying them.

A migration is a function of the database, numbered by its place in MIGRATIONS; PRAGMA
user_version records how many have run. Never edit one that has shipped: add the next.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
]


def migrate(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """Run the migrations this database has not had yet (inside the caller's transaction)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        migration(db)
        conn.execute(f"PRAGMA user_version={number}")
