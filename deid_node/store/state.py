"""`Store`, the class other modules use, and the state transitions of batches once complete:
claimed for processing, their results and deliveries recorded, failures, retries, recovery.

Rows:
- series: one per SeriesInstanceUID seen.
- batches: one per processing round of a series. Round 1 holds what arrived first; an instance
  arriving after its series left `receiving` opens the next round (late files, never dropped).
  state: receiving -> complete -> processing -> forwarding -> forwarded | rejected | failed
- instances: one per received instance in a batch (a re-sent SOPInstanceUID in the same batch
  replaces the earlier copy: idempotent). Holds the spool path and the per-file report (JSON).
  Recorded by store/receiving.py, which also completes stable batches.
- deliveries: one per (batch, destination): pending -> done | failed, attempts, next try;
  sent: what each destination acknowledged (store/deliveries.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

from deid_node.modes import DEFAULT_PROJECT
from deid_node.store.deliveries import DeliveryQueries
from deid_node.store.pulls import PullQueries
from deid_node.store.quarantine import QuarantineFiles
from deid_node.store.receiving import ReceivingQueries
from deid_node.store.replicas import ClaimLostError, ReplicaQueries
from deid_node.store.reports import ReportQueries
from deid_node.store.schema import processed_row, record_processed, utcnow
from deid_node.store.spool import SpoolFiles

# A newer copy of instance i's SOP Instance (a retry, re-send or release), in batch nb.
_NEWER_COPY = (
    "SELECT 1 FROM instances n JOIN batches nb ON nb.id = n.batch_id"
    " WHERE n.series_uid = i.series_uid AND n.project IS i.project AND n.sop_uid = i.sop_uid"
    " AND n.id > i.id"
)


class Store(
    SpoolFiles,
    QuarantineFiles,
    ReportQueries,
    PullQueries,
    DeliveryQueries,
    ReceivingQueries,
    ReplicaQueries,
):
    """The node's state in `data_dir`; the only writer of its database (with PostgreSQL: one of
    the replicas that share it, see store/replicas.py)."""

    # -- series state ---------------------------------------------------------------------

    def claim_batch(self) -> int | None:
        """Take the oldest complete batch for processing (complete -> processing)."""
        with self.transaction() as conn:
            # A round waits for the earlier rounds of its series: it is judged with their reports.
            row = conn.execute(
                "SELECT id FROM batches WHERE state = 'complete' AND NOT EXISTS (SELECT 1 FROM"
                " batches p WHERE p.series_uid = batches.series_uid AND p.project IS batches.project"
                " AND p.round < batches.round"
                " AND p.state IN ('receiving', 'complete', 'processing'))"
                f" ORDER BY last_received_at, id LIMIT 1{self.engine.skip_locked()}"
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE batches SET state = 'processing', processing_attempts = processing_attempts + 1,"
                " claimed_by = ?, lease_until = ? WHERE id = ?",
                (self.replica_id, time.time() + self.lease_seconds, row[0]),
            )
            return row[0]

    def processing_failed(self, batch_id: int, error: str, max_attempts: int) -> str:
        """An unexpected error while processing: try again later, or give up (failed, kept)."""
        with self.transaction() as conn:
            attempts = conn.execute(
                "SELECT processing_attempts FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()[0]
            state = "complete" if attempts < max_attempts else "failed"
            conn.execute(
                "UPDATE batches SET state = ?, summary = ?, claimed_by = NULL, lease_until = NULL,"
                " finished_at = CASE WHEN ? = 'failed' THEN ? END WHERE id = ? AND state = 'processing'"
                # A replica whose claim was taken over leaves the batch to the new holder.
                f"{' AND claimed_by IS ?' if self.shared else ''}",
                (
                    state,
                    json.dumps({"outcome": "failed", "error": error}),
                    state,
                    utcnow(),
                    batch_id,
                    *((self.replica_id,) if self.shared else ()),
                ),
            )
        return state

    def recover_after_restart(self) -> dict[str, int]:
        """Put interrupted work back in the queue: processing -> complete (outputs are derived
        deterministically, so redoing them is safe); forwarding keeps its deliveries."""
        # On a shared database only this replica's own claims: another's are its own (or,
        # once their lease ran out, anyone's: requeue_expired).
        mine = " AND claimed_by IS ?" if self.shared else ""
        params = (self.replica_id,) if self.shared else ()
        with self.transaction() as conn:
            processing = conn.execute(
                "UPDATE batches SET state = 'complete', claimed_by = NULL, lease_until = NULL"
                f" WHERE state = 'processing'{mine}",
                params,
            ).rowcount
            conn.execute(
                f"UPDATE deliveries SET claimed_by = NULL, lease_until = NULL WHERE 1 = 1{mine}",
                params,
            )
            if self.shared:
                conn.execute("DELETE FROM holds WHERE replica_id = ?", params)
        return {
            "requeued_processing": processing,
            "quarantine_moves_completed": self._complete_quarantine_moves(),
            "partial_files_removed": self.remove_stale_tmp(0),
            "orphan_spool_files_moved": self._move_orphan_spool_files(),
        }

    # -- processing -----------------------------------------------------------------------

    def batch(self, batch_id: int) -> dict[str, Any]:
        return self.query("SELECT * FROM batches WHERE id = ?", (batch_id,))[0]

    def batch_instances(self, batch_id: int) -> list[dict[str, Any]]:
        """The instances of a batch, paths absolute; `attempt` counts this SOP Instance's
        earlier copies that were quarantined, plus one (2: re-sent or retried once)."""
        rows = self.query(
            "SELECT i.*, 1 + (SELECT COUNT(*) FROM instances p WHERE p.series_uid = i.series_uid"
            " AND p.project IS i.project AND p.sop_uid = i.sop_uid AND p.id < i.id"
            " AND p.state = 'quarantined') AS attempt"
            " FROM instances i WHERE i.batch_id = ? ORDER BY i.id",
            (batch_id,),
        )
        return [self._with_absolute_paths(row) for row in rows]

    def earlier_reports(
        self, series_uid: str, before_round: int, project: str | None = DEFAULT_PROJECT
    ) -> list[dict[str, Any]]:
        """Reports of this series from earlier rounds in this project (a series is judged as a
        whole). A report superseded by a newer copy of its SOP Instance up to this round
        (retried, re-sent, released) is history, not evidence: the new attempt speaks for that
        instance."""
        rows = self.query(
            "SELECT i.report FROM instances i JOIN batches b ON b.id = i.batch_id"
            " WHERE b.series_uid = ?1 AND b.project IS ?3 AND b.round < ?2"
            " AND i.report IS NOT NULL"
            f" AND NOT EXISTS ({_NEWER_COPY} AND nb.round <= ?2)",
            (series_uid, before_round, project),
        )
        return [json.loads(r["report"]) for r in rows]

    def join_withheld(self, batch_id: int) -> int:
        """Series policy "all": a round holding a new attempt at an instance that held its
        series back (retried, re-sent or released: an earlier copy was quarantined or failed
        its conditions) takes with it every instance of earlier rounds the policy withheld
        (never sent anywhere, original still kept), so that a fixed series is judged, and
        leaves, whole. Their earlier rows are superseded. Returns how many joined; joining
        again finds nothing (the newest copy is then in this round)."""
        with self.transaction() as conn:
            series_uid, round_, project = conn.execute(
                "SELECT series_uid, round, project FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            renewed = conn.execute(
                "SELECT 1 FROM instances i JOIN instances p ON p.series_uid = i.series_uid"
                " AND p.project IS i.project AND p.sop_uid = i.sop_uid AND p.id < i.id"
                " WHERE i.batch_id = ?"
                " AND (p.state = 'quarantined' OR p.error IS NOT NULL"
                " OR (json_extract(p.report, '$.save_condition') = 0"
                " AND json_extract(p.report, '$.removed') IS NULL)) LIMIT 1",
                (batch_id,),
            ).fetchone()
            if renewed is None:
                return 0
            columns = [d[0] for d in conn.execute("SELECT * FROM instances LIMIT 0").description]
            withheld = [
                dict(zip(columns, values, strict=True))
                for values in conn.execute(
                    "SELECT i.* FROM instances i JOIN batches b ON b.id = i.batch_id"
                    " WHERE b.series_uid = ?1 AND b.project IS ?3 AND b.round < ?2"
                    " AND i.spool_path IS NOT NULL"
                    " AND json_extract(i.report, '$.withheld') IS NOT NULL"
                    " AND NOT EXISTS (SELECT 1 FROM sent s WHERE s.instance_id = i.id)"
                    f" AND NOT EXISTS ({_NEWER_COPY}) ORDER BY i.id",
                    (series_uid, round_, project),
                )
            ]
            stamp = utcnow()
            joined = 0
            for row in withheld:
                if not self.absolute(row["spool_path"]).exists():
                    continue  # released by retention: nothing left to send
                self._new_attempt(conn, batch_id, row, row["spool_path"], stamp)
                joined += 1
        return joined

    def _new_attempt(
        self, conn: Any, batch_id: int, row: dict[str, Any], path: str, stamp: str
    ) -> None:
        """A new row for an instance in round `batch_id`, owning its original at `path`; the
        old row keeps its report (history) and no longer the file (its clean-up must not
        delete it)."""
        conn.execute(
            "INSERT INTO instances (batch_id, series_uid, study_uid, sop_uid, sop_class_uid,"
            " transfer_syntax, calling_ae, peer, url, spool_path, size, received_at, sha256,"
            " project, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received')",
            (
                batch_id,
                row["series_uid"],
                row["study_uid"],
                row["sop_uid"],
                row["sop_class_uid"],
                row["transfer_syntax"],
                row["calling_ae"],
                row["peer"],
                row["url"],
                path,
                row["size"],
                stamp,
                row["sha256"],
                row["project"],
            ),
        )
        conn.execute("UPDATE instances SET spool_path = NULL WHERE id = ?", (row["id"],))

    def finish_processing(
        self,
        batch_id: int,
        results: list[dict[str, Any]],
        *,
        passed: bool,
        destinations: list[str],
        summary: dict[str, Any],
    ) -> str:
        """Store every instance's outcome and report, and queue deliveries, in one transaction.

        results: {"instance_id", "state", "report", "deid_path", "sop_uid_deid", "error"}.
        Returns the batch's new state: forwarding, or rejected/failed when nothing is to be sent.
        """
        to_send = [r for r in results if r.get("deid_path")]
        if to_send and destinations:
            state = "forwarding"
        elif summary.get("outcome") == "failed":
            state = "failed"
        else:
            state = "rejected" if not to_send else "forwarded"
        now = utcnow()
        with self.transaction() as conn:
            if self.shared:
                # Only the replica holding the claim records results: after its lease ran out
                # another one processes the batch again (same derived outputs), and records.
                claim = conn.execute(
                    f"SELECT state, claimed_by FROM batches WHERE id = ?{self.engine.for_update()}",
                    (batch_id,),
                ).fetchone()
                if tuple(claim) != ("processing", self.replica_id):
                    raise ClaimLostError(f"batch {batch_id}: claim lost to another replica")
            for r in results:
                report = r["report"]
                if report.get("quarantine"):
                    report = {**report, "quarantine": self.relative(report["quarantine"])}
                conn.execute(
                    "UPDATE instances SET state=?, report=?, deid_path=?, sop_uid_deid=?, error=? WHERE id=?",
                    (
                        r["state"],
                        json.dumps(report),
                        self.relative(r["deid_path"]) if r.get("deid_path") else None,
                        r.get("sop_uid_deid"),
                        r.get("error"),
                        r["instance_id"],
                    ),
                )
            if state == "forwarding":
                for name in destinations:
                    conn.execute(
                        "INSERT OR IGNORE INTO deliveries (batch_id, destination, state, attempts,"
                        " next_attempt_at, updated_at) VALUES (?, ?, 'pending', 0, 0, ?)",
                        (batch_id, name, now),
                    )
            conn.execute(
                "UPDATE batches SET state=?, passed=?, processed_at=?, summary=?, claimed_by=NULL,"
                " lease_until=NULL,"
                " finished_at=CASE WHEN ? IN ('rejected','failed','forwarded') THEN ? END WHERE id=?",
                (state, int(passed), now, json.dumps(summary), state, now, batch_id),
            )
            if processed_row(summary) is not None:
                # One writer of `processed` at a time (PostgreSQL replicas: until this commit), so
                # that its rows become visible in the order of their ids: /metrics, reading the
                # rows after the last id it counted, never passes one still uncommitted.
                self.engine.lock_key(conn, "processed")
                record_processed(conn, batch_id, summary)
        return state

    def retry_processing(self, series_uid: str, project: str | None = None) -> dict[str, int]:
        """Re-queue what failed processing in a series (operator's `deid-node retry`, after
        fixing the cause), in every project or in `project`: batches whose processing raised
        until they failed go back to complete; every quarantined instance whose original is
        still kept gets a new attempt, in a new round of its project (its earlier report stays,
        as the first attempt's, superseded: no longer evidence when the series is judged).
        Under series policy "all" the node's processing of that round brings the instances the
        policy withheld along (`join_withheld`)."""
        now, stamp = time.time(), utcnow()
        scope = "" if project is None else " AND project = ?"
        params: tuple[str, ...] = (series_uid,) if project is None else (series_uid, project)
        with self.transaction() as conn:
            batches = conn.execute(
                "UPDATE batches SET state = 'complete', processing_attempts = 0, summary = NULL,"
                " finished_at = NULL, completed_at = ? WHERE series_uid = ? AND state = 'failed'"
                f" AND processed_at IS NULL{scope}",
                (stamp, *params),
            ).rowcount
            # The latest copy of each quarantined SOP Instance (an earlier retry's is history).
            quarantined = conn.execute(
                "SELECT i.* FROM instances i WHERE i.series_uid = ? AND i.state = 'quarantined'"
                f" AND i.project IS NOT NULL{scope.replace('project', 'i.project')}"
                f" AND NOT EXISTS ({_NEWER_COPY}) ORDER BY i.id",
                params,
            ).fetchall()
            columns = [d[0] for d in conn.execute("SELECT * FROM instances LIMIT 0").description]
            kept: dict[str, list[tuple[dict[str, Any], str]]] = {}
            for values in quarantined:
                row = dict(zip(columns, values, strict=True))
                target = json.loads(row["report"] or "{}").get("quarantine")
                # Kept in the quarantine, or still in the spool when the move never happened.
                for candidate in (target, row["spool_path"]):
                    if candidate and self.absolute(candidate).exists():
                        kept.setdefault(row["project"], []).append((row, candidate))
                        break
            for name, rows in kept.items():
                last = conn.execute(
                    "SELECT COALESCE(MAX(round), 0) FROM batches WHERE series_uid = ?"
                    " AND project = ?",
                    (series_uid, name),
                ).fetchone()[0]
                batch_id = conn.execute(
                    "INSERT INTO batches (project, series_uid, round, state, calling_ae,"
                    " created_at, completed_at, last_received_at)"
                    " VALUES (?, ?, ?, 'complete', ?, ?, ?, ?)",
                    (name, series_uid, last + 1, rows[0][0]["calling_ae"], stamp, stamp, now),
                ).lastrowid
                for row, path in rows:
                    self._new_attempt(conn, batch_id, row, path, stamp)
        return {"batches": batches, "instances": sum(len(rows) for rows in kept.values())}
