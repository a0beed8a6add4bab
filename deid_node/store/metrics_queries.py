"""Read queries and the few writes of the operator console (deid_node/console): counts for
/metrics, pages of series and quarantined files, the audit trail, the health probe.

Functions of a Store, so that the SQL stays in this package. Nothing returned here holds a
patient value: UIDs (original ones), AE titles, states, reasons written by our own code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from deid_node.store.base import StoreBase
from deid_node.store.schema import utcnow

PAGE_MAX = 500
# A quarantined instance the operator can act on: its latest attempt (a retried one is history),
# its original still kept (not discarded).
_KEPT = (
    "i.state = 'quarantined' AND NOT EXISTS (SELECT 1 FROM instances n WHERE"
    " n.series_uid = i.series_uid AND n.project IS i.project AND n.sop_uid = i.sop_uid"
    " AND n.id > i.id)"
    " AND (i.spool_path IS NOT NULL OR json_extract(i.report, '$.quarantine') IS NOT NULL)"
)


# How far behind the highest id seen a row of `instances` or `refused` (`sent`: sent_order) is
# settled: added once into /metrics' running totals and never read again. Replicas sharing
# PostgreSQL take a row's id at INSERT and make the row visible at COMMIT, so a row can appear
# after rows with higher ids (its transaction still waiting on a series lock, an fsync, a slow
# disk): the rows above the watermark are counted afresh at every scrape, and a row is missed
# only if it commits after this many later ids were taken (10,000 receipts: seconds to minutes
# at any ingest rate this node reaches). The receipt path is hot, so no lock orders these
# commits (as one does the rare `processed` rows); a scrape reads at most this many rows more,
# through the id index.
APPENDED_MARGIN = 10_000


def sent_order(store: StoreBase) -> str:
    """The column that numbers `sent` rows in the order they were inserted: SQLite's rowid
    (nothing deletes a row, so rowids only grow; an upsert keeps its row's), on PostgreSQL
    `seq`, from a sequence (schema.PG_SCHEMA_STEPS; NULL on rows from before migration 13)."""
    return "rowid" if store.engine.dialect == "sqlite" else "seq"


def appended_heads(store: StoreBase) -> dict[str, int]:
    """The highest id of `instances` and of `refused`, and the highest sent_order of `sent`,
    visible now (0: no row)."""
    return store.query(
        "SELECT (SELECT COALESCE(MAX(id), 0) FROM instances) AS instances,"
        " (SELECT COALESCE(MAX(id), 0) FROM refused) AS refused,"
        f" (SELECT COALESCE(MAX({sent_order(store)}), 0) FROM sent) AS sent"
    )[0]


def sent_unordered(store: StoreBase) -> list[dict[str, Any]]:
    """Acknowledgements by destination (n) among the `sent` rows without a place in the order:
    on PostgreSQL those written before migration 13 (the rows it found keep seq NULL rather
    than be rewritten, millions of them, under its lock). Their number never changes (no row
    gets seq NULL later: the column's default numbers every insert, old replicas' too), so the
    collector adds them once. None on SQLite."""
    if store.engine.dialect == "sqlite":
        return []
    return store.query(
        "SELECT destination, COUNT(*) AS n FROM sent WHERE seq IS NULL GROUP BY destination"
    )


def appended_counts(
    store: StoreBase, after: dict[str, int], upto: dict[str, int] | None = None
) -> dict[str, Any]:
    """Counts of the append-only tables over the rows with after[table] < id <= upto[table]
    (no upper bound without `upto`; `sent`: its sent_order): received instances by calling AE
    (n, bytes), refused ones by status and calling AE (n), acknowledgements by destination
    (n). Every instances row counts: an instance re-processed by
    `retry` or the console counts as received again. The console's collector
    (console/metrics.py) settles the rows up to a watermark once and recounts those above it
    at each scrape."""
    bound = " AND id <= ?" if upto is not None else ""
    order = sent_order(store)

    def between(table: str) -> tuple[int, ...]:
        return (after.get(table, 0),) + ((upto.get(table, 0),) if upto is not None else ())

    return {
        "received": store.query(
            "SELECT calling_ae, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes"
            f" FROM instances WHERE id > ?{bound} GROUP BY calling_ae",
            between("instances"),
        ),
        "refused": store.query(
            f"SELECT status, calling_ae, COUNT(*) AS n FROM refused WHERE id > ?{bound}"
            " GROUP BY status, calling_ae",
            between("refused"),
        ),
        "sent": store.query(
            f"SELECT destination, COUNT(*) AS n FROM sent WHERE {order} > ?"
            f"{f' AND {order} <= ?' if upto is not None else ''} GROUP BY destination",
            between("sent"),
        ),
    }


def overview_counts(store: StoreBase) -> dict[str, list[dict[str, Any]]]:
    """Series rounds by state, deliveries by destination and state (the console's overview)."""
    return {
        "series": store.query("SELECT state, COUNT(*) AS n FROM batches GROUP BY state"),
        "deliveries": store.query(
            "SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY destination, state"
        ),
    }


def metric_counts(store: StoreBase) -> dict[str, list[dict[str, Any]]]:
    """What /metrics reports from the database besides the appended counts, read at scrape
    time: correct whichever process or thread did the work, and across restarts."""
    q = store.query
    # Spelled differently by the two engines (engine.to_postgres leaves functions as they are).
    find, least = ("strpos", "least") if store.engine.dialect == "postgresql" else ("instr", "min")
    return {
        **overview_counts(store),
        # The kind of reason (the text before its first colon, as our own messages start with
        # it): bounded label values, never a detail of one file.
        "quarantined": q(
            f"SELECT substr(COALESCE(error, 'unknown'), 1, CASE WHEN {find}(error, ':') > 0"
            f" THEN {least}({find}(error, ':') - 1, 60) ELSE 60 END) AS reason, COUNT(*) AS n"
            " FROM instances WHERE state = 'quarantined' GROUP BY reason"
        ),
    }


PROCESSED_CHUNK = 10_000


def processed_after(
    store: StoreBase, after: int, limit: int = PROCESSED_CHUNK
) -> list[dict[str, Any]]:
    """Series rounds processed (the append-only `processed` table, one row written with each
    round's summary) after row id `after`, in id order, at most `limit`: {"id", "duration_s"
    (None: not a number), "ocr_seconds" (the summary's histogram as JSON, or None)}."""
    return store.query(
        "SELECT id, duration_s, ocr_seconds FROM processed WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )


def probe_writable(store: StoreBase) -> None:
    """Rewrite one row: raises (sqlite3.Error, StoreUnavailableError) when the database
    takes no writes."""
    with store.transaction(power_safe=False) as conn:
        conn.execute(
            "INSERT INTO health_probe (id, at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            (utcnow(),),
        )


def received_since(store: StoreBase, since: str) -> int:
    return store.query("SELECT COUNT(*) AS n FROM instances WHERE received_at >= ?", (since,))[0][
        "n"
    ]


def received_per_minute(store: StoreBase, since: str) -> list[dict[str, Any]]:
    """Instances received per minute since `since` (ISO UTC): the overview's chart."""
    return store.query(
        "SELECT substr(received_at, 1, 16) AS minute, COUNT(*) AS n FROM instances"
        " WHERE received_at >= ? GROUP BY minute ORDER BY minute",
        (since,),
    )


def series_page(
    store: StoreBase,
    *,
    state: str | None = None,
    calling_ae: str | None = None,
    since: str | None = None,
    until: str | None = None,
    project: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Rounds of series (one row per batch), newest first, and how many match in all.
    since/until: ISO dates (UTC), the day the round's first instance arrived, both included."""
    where, params = ["1"], []
    if project:
        where.append("b.project = ?")
        params.append(project)
    if since:
        where.append("b.created_at >= ?")
        params.append(since)
    if until:
        where.append("substr(b.created_at, 1, 10) <= ?")
        params.append(until)
    if state:
        where.append("b.state = ?")
        params.append(state)
    if calling_ae:
        where.append("b.calling_ae = ?")
        params.append(calling_ae)
    clause = " AND ".join(where)
    total = store.query(f"SELECT COUNT(*) AS n FROM batches b WHERE {clause}", tuple(params))[0][
        "n"
    ]
    # `+i.state`: the count per batch stays on the batch_id index (the state index would
    # make it walk every quarantined row of the database for each batch listed).
    rows = store.query(
        "SELECT b.id, b.project, b.series_uid, b.round, b.state, b.calling_ae, b.created_at,"
        " b.finished_at,"
        " b.passed, (SELECT COUNT(*) FROM instances i WHERE i.batch_id = b.id) AS instances,"
        " (SELECT COUNT(*) FROM instances i WHERE i.batch_id = b.id AND +i.state = 'quarantined')"
        f" AS quarantined FROM batches b WHERE {clause} ORDER BY b.id DESC LIMIT ? OFFSET ?",
        (*params, min(max(limit, 1), PAGE_MAX), max(offset, 0)),
    )
    return rows, total


def series_detail(store: StoreBase, series_uid: str) -> dict[str, Any] | None:
    """A series: its rounds, files (state, reason, condition evaluations), destination states."""
    batches = store.query(
        "SELECT id, project, round, state, calling_ae, created_at, completed_at, processed_at,"
        " finished_at, passed, processing_attempts FROM batches WHERE series_uid = ?"
        " ORDER BY project, round",
        (series_uid,),
    )
    if not batches:
        return None
    files = []
    for row in store.query(
        "SELECT id, batch_id, project, sop_uid, sop_class_uid, transfer_syntax, calling_ae, size,"
        " received_at, state, error, sop_uid_deid, deid_path, report FROM instances"
        " WHERE series_uid = ?"
        " ORDER BY id",
        (series_uid,),
    ):
        report = json.loads(row.pop("report") or "{}")
        # The report's condition results: a tag value only where the report shows one (kinds
        # of attribute that identify nobody: ImageType, Modality...).
        row["evaluations"] = [
            {
                "condition_type": (e.get("condition") or {}).get("condition_type"),
                "dicom_tag": (e.get("condition") or {}).get("dicom_tag"),
                "tag_value": e.get("tag_value"),
                "evaluated_value": e.get("evaluated_value"),
            }
            for e in report.get("save_conditions_evaluations") or []
            if isinstance(e, dict)
        ]
        row["save_condition"] = report.get("save_condition")
        deid_path = row.pop("deid_path")
        row["deid_kept"] = bool(deid_path) and store.absolute(deid_path).is_file()
        files.append(row)
    deliveries = store.query(
        "SELECT d.batch_id, d.destination, d.state, d.attempts, d.last_error, d.updated_at"
        " FROM deliveries d JOIN batches b ON b.id = d.batch_id WHERE b.series_uid = ?"
        " ORDER BY d.batch_id, d.destination",
        (series_uid,),
    )
    return {"series_uid": series_uid, "rounds": batches, "files": files, "deliveries": deliveries}


def deid_output(store: StoreBase, series_uid: str, instance_id: int) -> Path | None:
    """The de-identified file of an instance of this series while it is kept, else None."""
    rows = store.query(
        "SELECT deid_path FROM instances WHERE id = ? AND series_uid = ? AND deid_path IS NOT NULL",
        (instance_id, series_uid),
    )
    if not rows:
        return None
    path = store.absolute(rows[0]["deid_path"])
    return path if path.is_file() else None


def quarantine_page(
    store: StoreBase, *, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Quarantined instances whose original is still kept (not discarded), newest first."""
    clause = _KEPT
    total = store.query(f"SELECT COUNT(*) AS n FROM instances i WHERE {clause}")[0]["n"]
    rows = store.query(
        "SELECT id, batch_id, project, series_uid, sop_uid, calling_ae, received_at,"
        " error AS reason, json_type(report, '$.pixels.review_regions') IS NOT NULL AS review"
        f" FROM instances i WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
        (min(max(limit, 1), PAGE_MAX), max(offset, 0)),
    )
    for row in rows:
        row["review"] = bool(row["review"])
    return rows, total


def quarantine_review(store: StoreBase, instance_id: int) -> tuple[Path, list[list[int]]] | None:
    """The kept original of an instance held for pixel review and frame 0's regions the
    redaction blanks (deid/pixels.py: PixelReviewError), or None: not held for review, its
    original gone, or quarantined before the regions were recorded (never shown unblanked)."""
    row = quarantined_instance(store, instance_id)
    if row is None:
        return None
    regions = store.query(
        "SELECT json_extract(report, '$.pixels.review_regions') AS r FROM instances WHERE id = ?",
        (instance_id,),
    )[0]["r"]
    if regions is None:
        return None
    kept = next((store.absolute(p) for p in row["kept"] if store.absolute(p).is_file()), None)
    if kept is None:
        return None
    parsed = json.loads(regions)
    return kept, [[int(v) for v in r[:4]] for r in parsed if isinstance(r, list) and len(r) >= 4]


def quarantined_instance(store: StoreBase, instance_id: int) -> dict[str, Any] | None:
    rows = store.query(
        "SELECT id, series_uid, sop_uid, state, error AS reason, spool_path, report"
        f" FROM instances i WHERE id = ? AND {_KEPT}",
        (instance_id,),
    )
    if not rows:
        return None
    row = rows[0]
    kept = json.loads(row.pop("report") or "{}").get("quarantine")
    row["kept"] = [p for p in (kept, row.pop("spool_path")) if p]
    return row


def discard_quarantined(store: StoreBase, instance_id: int) -> bool:
    """Delete the kept original of a quarantined instance (operator's decision): the row stays,
    as its report, with nothing left to retry. False when there is no such instance."""
    row = quarantined_instance(store, instance_id)
    if row is None:
        return False
    for stored in row["kept"]:
        store.absolute(stored).unlink(missing_ok=True)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE instances SET spool_path = NULL, report = json_set(COALESCE(report, '{}'),"
            " '$.quarantine', NULL) WHERE id = ?",
            (instance_id,),
        )
    return True


# Quarantine reasons an operator may release after looking at the image: the pixel review holds
# (deid/pixels.py: BurnedInAnnotation YES with no text found, redaction over
# max_redacted_fraction). Any other reason (an identifying value left, an encapsulated
# document, a file that cannot be read) is never released as is.
RELEASABLE_SUFFIX = "held for review"


def release_quarantined(store: StoreBase, instance_id: int) -> bool:
    """Queue a quarantined instance held for pixel review again, in a new round of its series,
    marked reviewed: processed without the review holds (the redaction still runs). False when
    it is not such an instance, or its original is no longer kept."""
    row = quarantined_instance(store, instance_id)
    if row is None or not (row["reason"] or "").endswith(RELEASABLE_SUFFIX):
        return False
    kept = next((p for p in row["kept"] if store.absolute(p).exists()), None)
    if kept is None:
        return False
    stamp = utcnow()
    with store.transaction() as conn:
        full = conn.execute(
            "SELECT series_uid, study_uid, sop_uid, sop_class_uid, transfer_syntax, calling_ae,"
            " peer, url, size, sha256, project FROM instances WHERE id = ?",
            (instance_id,),
        ).fetchone()
        # The new round belongs to the same project (a series is one per project).
        project = full[10]
        last = conn.execute(
            "SELECT COALESCE(MAX(round), 0) FROM batches WHERE series_uid = ? AND project IS ?",
            (full[0], project),
        ).fetchone()[0]
        batch_id = conn.execute(
            "INSERT INTO batches (project, series_uid, round, state, calling_ae, created_at,"
            " completed_at, last_received_at) VALUES (?, ?, ?, 'complete', ?, ?, ?, ?)",
            (project, full[0], last + 1, full[5], stamp, stamp, time.time()),
        ).lastrowid
        conn.execute(
            "INSERT INTO instances (batch_id, project, series_uid, study_uid, sop_uid,"
            " sop_class_uid, transfer_syntax, calling_ae, peer, url, spool_path, size,"
            " received_at, sha256, state, pixels_reviewed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, 'received', 1)",
            (batch_id, project, *full[:8], kept, full[8], stamp, full[9]),
        )
        # The new attempt owns the file: the old row's clean-up must not delete it.
        conn.execute("UPDATE instances SET spool_path = NULL WHERE id = ?", (instance_id,))
    return True


def project_names(store: StoreBase) -> list[str]:
    """The projects that have series rounds (the series page's filter)."""
    return [
        r["project"]
        for r in store.query(
            "SELECT DISTINCT project FROM batches WHERE project IS NOT NULL ORDER BY project"
        )
    ]


def refused_page(
    store: StoreBase, *, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Instances the SCP refused whose bytes are kept in the quarantine, newest first."""
    clause = "quarantine_path IS NOT NULL"
    total = store.query(f"SELECT COUNT(*) AS n FROM refused WHERE {clause}")[0]["n"]
    rows = store.query(
        "SELECT id, received_at, calling_ae, sop_uid, status, reason FROM refused"
        f" WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
        (min(max(limit, 1), PAGE_MAX), max(offset, 0)),
    )
    for row in rows:
        row["status"] = f"0x{row['status']:04X}"
    return rows, total


def discard_refused(store: StoreBase, refused_id: int) -> dict[str, Any] | None:
    """Delete the kept bytes of a refused instance; its row stays. None: nothing kept."""
    rows = store.query(
        "SELECT id, sop_uid, quarantine_path FROM refused WHERE id = ?"
        " AND quarantine_path IS NOT NULL",
        (refused_id,),
    )
    if not rows:
        return None
    store.absolute(rows[0]["quarantine_path"]).unlink(missing_ok=True)
    with store.transaction() as conn:
        conn.execute("UPDATE refused SET quarantine_path = NULL WHERE id = ?", (refused_id,))
    return rows[0]


def record_audit(
    store: StoreBase, *, user: str, role: str, action: str, target: str, detail: str = ""
) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO audit (at, user, role, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (utcnow(), user, role, action, target, detail),
        )


def audit_page(
    store: StoreBase, *, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    total = store.query("SELECT COUNT(*) AS n FROM audit")[0]["n"]
    rows = store.query(
        "SELECT id, at, user, role, action, target, detail FROM audit ORDER BY id DESC"
        " LIMIT ? OFFSET ?",
        (min(max(limit, 1), PAGE_MAX), max(offset, 0)),
    )
    return rows, total
