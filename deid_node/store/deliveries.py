"""Deliveries: one per (batch, destination), pending -> done | failed, with attempts, the next
try and (replicas) the claim of the replica sending it; `sent` holds what each destination
acknowledged, so that a retry or a takeover never sends an instance twice, and `dest_refused`
what it refused for good.
"""

from __future__ import annotations

import json
import time
from typing import Any

from deid_node.store.replicas import ReplicaQueries
from deid_node.store.schema import utcnow

# Instances of a batch (?1) written for sending that a destination (?2) has neither
# acknowledged nor refused for good.
_UNSENT = (
    "instances i WHERE i.batch_id = ?1 AND i.deid_path IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM sent s WHERE s.instance_id = i.id AND s.destination = ?2)"
    " AND NOT EXISTS (SELECT 1 FROM dest_refused r WHERE r.instance_id = i.id"
    " AND r.destination = ?2)"
)


class DeliveryQueries(ReplicaQueries):
    def due_deliveries(self) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at, id",
            (time.time(),),
        )

    def claim_due_delivery(self, destination: str) -> dict[str, Any] | None:
        """The next due delivery to `destination`, claimed by this replica for lease_seconds
        (no other replica sends it meanwhile); the attempt's end (done, failed) releases it."""
        now = time.time()
        unclaimed = " AND (claimed_by IS NULL OR lease_until < ?)" if self.shared else ""
        with self.transaction() as conn:
            cursor = conn.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND destination = ?"
                f" AND next_attempt_at <= ?{unclaimed} ORDER BY next_attempt_at, id LIMIT 1"
                f"{self.engine.skip_locked()}",
                (destination, now, now) if self.shared else (destination, now),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            delivery = dict(zip([d[0] for d in cursor.description], row, strict=True))
            conn.execute(
                "UPDATE deliveries SET claimed_by = ?, lease_until = ? WHERE id = ?",
                (self.replica_id, now + self.lease_seconds, delivery["id"]),
            )
        return delivery

    def unsent_instances(self, batch_id: int, destination: str) -> list[dict[str, Any]]:
        rows = self.query(f"SELECT i.* FROM {_UNSENT} ORDER BY i.id", (batch_id, destination))
        return [self._with_absolute_paths(row) for row in rows]

    def mark_sent(self, acknowledged: list[tuple[int, str, str, int]]) -> None:
        """Record instances a destination acknowledged: (instance_id, destination, url_deid,
        status), one transaction for the lot. The first success sets the report's url_deid.

        Called once per acknowledgement, before the next instance is sent: a kill -9 then
        re-sends at most the one instance in flight. The commit survives a crash of the
        process without an fsync (cheap); only a power loss may cost re-sends, never a loss.
        """
        if not acknowledged:
            return
        with self.transaction(power_safe=False) as conn:
            for instance_id, destination, url_deid, status in acknowledged:
                conn.execute(
                    "INSERT INTO sent (instance_id, destination, url_deid, status, at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance_id, destination) DO UPDATE"
                    " SET url_deid = excluded.url_deid, status = excluded.status, at = excluded.at",
                    (instance_id, destination, url_deid, status, utcnow()),
                )
                row = conn.execute(
                    f"SELECT report FROM instances WHERE id = ?{self.engine.for_update()}",
                    (instance_id,),
                ).fetchone()
                report = json.loads(row[0])
                if report.get("url_deid") is None:
                    report["url_deid"] = url_deid
                report.setdefault("destinations", {})[destination] = {
                    "state": "sent",
                    "status": status,
                }
                conn.execute(
                    "UPDATE instances SET report = ? WHERE id = ?",
                    (json.dumps(report), instance_id),
                )

    def mark_refused_by_destination(
        self, instance_id: int, destination: str, status: int | None, reason: str
    ) -> None:
        """Record an instance the destination refused for good (status None: no presentation
        context for it); it is not offered again until `retry`. Its report says why."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO dest_refused (instance_id, destination, status, reason, at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance_id, destination) DO UPDATE"
                " SET status = excluded.status, reason = excluded.reason, at = excluded.at",
                (instance_id, destination, status, reason, utcnow()),
            )
            (text,) = conn.execute(
                f"SELECT report FROM instances WHERE id = ?{self.engine.for_update()}",
                (instance_id,),
            ).fetchone()
            report = json.loads(text)
            report.setdefault("destinations", {})[destination] = {
                "state": "refused",
                "status": status,
                "error": reason,
            }
            conn.execute(
                "UPDATE instances SET report = ? WHERE id = ?", (json.dumps(report), instance_id)
            )

    def refused_by_destination(self, batch_id: int, destination: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT r.* FROM dest_refused r JOIN instances i ON i.id = r.instance_id"
            " WHERE i.batch_id = ? AND r.destination = ? ORDER BY r.instance_id",
            (batch_id, destination),
        )

    def make_deliveries_due(self, destination: str) -> int:
        """Pending deliveries to `destination` waiting out a backoff become due now (it is back)."""
        now = time.time()
        with self.transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE state = 'pending'"
                " AND destination = ? AND next_attempt_at > ?",
                (now, destination, now),
            ).rowcount

    def delivery_attempt_failed(self, delivery_id: int, error: str, retry_at: float | None) -> None:
        """Count a failed attempt; retry_at None means the retry limit is reached (failed).

        The reports of the instances still unsent show the destination's state and last error.
        """
        with self.transaction() as conn:
            batch_id, destination, attempts = conn.execute(
                "SELECT batch_id, destination, attempts FROM deliveries WHERE id = ?",
                (delivery_id,),
            ).fetchone()
            state = {
                "state": "retrying" if retry_at is not None else "failed",
                "attempts": attempts + 1,
                "last_error": error,
            }
            unsent = conn.execute(
                f"SELECT i.id, i.report FROM {_UNSENT}{self.engine.for_update()}",
                (batch_id, destination),
            ).fetchall()
            for instance_id, text in unsent:
                report = json.loads(text)
                report.setdefault("destinations", {})[destination] = state
                conn.execute(
                    "UPDATE instances SET report = ? WHERE id = ?",
                    (json.dumps(report), instance_id),
                )
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, updated_at = ?,"
                " state = ?, next_attempt_at = COALESCE(?, next_attempt_at), claimed_by = NULL,"
                " lease_until = NULL WHERE id = ?",
                (
                    error,
                    utcnow(),
                    "pending" if retry_at is not None else "failed",
                    retry_at,
                    delivery_id,
                ),
            )
            if retry_at is None:
                self._settle_batch(conn, delivery_id)

    def delivery_done(self, delivery_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, last_error = NULL,"
                " updated_at = ?, claimed_by = NULL, lease_until = NULL WHERE id = ?",
                (utcnow(), delivery_id),
            )
            self._settle_batch(conn, delivery_id)

    def _settle_batch(self, conn: Any, delivery_id: int) -> None:
        """When no delivery of the batch is pending any more, the batch is forwarded or failed."""
        batch_id = conn.execute(
            "SELECT batch_id FROM deliveries WHERE id = ?", (delivery_id,)
        ).fetchone()[0]
        states = [
            r[0]
            for r in conn.execute("SELECT state FROM deliveries WHERE batch_id = ?", (batch_id,))
        ]
        if "pending" in states:
            return
        final = "forwarded" if all(s == "done" for s in states) else "failed"
        conn.execute(
            "UPDATE batches SET state = ?, finished_at = ? WHERE id = ? AND state = 'forwarding'",
            (final, utcnow(), batch_id),
        )

    def fail_orphan_deliveries(self, configured: list[str]) -> int:
        """Pending deliveries to a destination no longer in the config would wait forever:
        fail them (kept, and sent again by `retry` once the destination is back)."""
        with self.transaction() as conn:
            marks = ",".join("?" * len(configured)) or "''"
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM deliveries WHERE state = 'pending' AND destination NOT IN ({marks})",
                    tuple(configured),
                )
            ]
        for delivery_id in ids:
            self.delivery_attempt_failed(delivery_id, "destination no longer in the config", None)
        return len(ids)

    def retry_series(self, series_uid: str, project: str | None = None) -> int:
        """Re-queue the failed deliveries of a series, in every project or in `project`
        (operator's `deid-node retry`); instances a destination refused for good are offered
        again (the operator fixed the cause)."""
        scope = "" if project is None else " AND project = ?"
        params: tuple[str, ...] = (series_uid,) if project is None else (series_uid, project)
        batches = f"SELECT id FROM batches WHERE series_uid = ?{scope}"
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM dest_refused WHERE EXISTS (SELECT 1 FROM deliveries d"
                " JOIN instances i ON i.batch_id = d.batch_id WHERE d.state = 'failed'"
                f" AND d.batch_id IN ({batches}) AND i.id = dest_refused.instance_id"
                " AND d.destination = dest_refused.destination)",
                params,
            )
            count = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0,"
                f" updated_at = ? WHERE state = 'failed' AND batch_id IN ({batches})",
                (utcnow(), *params),
            ).rowcount
            conn.execute(
                f"UPDATE batches SET state = 'forwarding', finished_at = NULL WHERE id IN ({batches})"
                " AND id IN (SELECT batch_id FROM deliveries WHERE state = 'pending')",
                params,
            )
        return count
