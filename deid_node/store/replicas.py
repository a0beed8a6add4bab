"""Replicas sharing one PostgreSQL database (issue 18): who is alive, what each one holds.

A replica claims a batch to process or a delivery to send for `lease_seconds`; its heartbeat
renews the lease every third of it. When a replica dies its leases run out and any other
replica puts the work back in the queue (`requeue_expired`), where the next claim takes it.
Batches an open association of a replica holds back from completion are rows of `holds`, let go
when the association closes or the replica stops beating. On SQLite (one node) the same columns
are written, and nothing ever expires while the node runs: it is the only one.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from deid_node.errors import DeidNodeError
from deid_node.store.base import StoreBase
from deid_node.store.schema import utcnow

DEFAULT_LEASE_SECONDS = 30.0


class ClaimLostError(DeidNodeError):
    """This replica's lease on a batch ran out and another replica took the work over: its
    results are not recorded (the other replica's are)."""


class ReplicaQueries(StoreBase):
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    def register_replica(self, port: int) -> None:
        """This replica is alive (its row, heartbeat now)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO replicas (replica_id, host, port, pid, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET"
                " host = excluded.host, port = excluded.port, pid = excluded.pid,"
                " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                (self.replica_id, socket.gethostname(), port, os.getpid(), utcnow(), time.time()),
            )

    def heartbeat(self) -> None:
        """Renew this replica's heartbeat and the leases of everything it holds."""
        now = time.time()
        until = now + self.lease_seconds
        with self.transaction(power_safe=False) as conn:
            conn.execute(
                "UPDATE replicas SET heartbeat_at = ? WHERE replica_id = ?", (now, self.replica_id)
            )
            conn.execute(
                "UPDATE batches SET lease_until = ? WHERE claimed_by = ? AND state = 'processing'",
                (until, self.replica_id),
            )
            conn.execute(
                "UPDATE deliveries SET lease_until = ? WHERE claimed_by = ? AND state = 'pending'",
                (until, self.replica_id),
            )

    def requeue_expired(self) -> dict[str, int]:
        """Work whose holder stopped renewing its lease goes back in the queue: processing ->
        complete, a claimed delivery unclaimed; an association hold of a replica whose heartbeat
        stopped is let go (its series becomes stable `stable_seconds` from now)."""
        now = time.time()
        with self.transaction() as conn:
            batches = conn.execute(
                "UPDATE batches SET state = 'complete', claimed_by = NULL, lease_until = NULL"
                " WHERE state = 'processing' AND lease_until < ?",
                (now,),
            ).rowcount
            deliveries = conn.execute(
                "UPDATE deliveries SET claimed_by = NULL, lease_until = NULL"
                " WHERE claimed_by IS NOT NULL AND lease_until < ?",
                (now,),
            ).rowcount
            dead = [
                r[0]
                for r in conn.execute(
                    "SELECT replica_id FROM replicas WHERE heartbeat_at < ? AND replica_id != ?",
                    (now - self.lease_seconds, self.replica_id),
                )
            ]
            holds = 0
            for replica in dead:
                held = [
                    r[0]
                    for r in conn.execute(
                        "SELECT batch_id FROM holds WHERE replica_id = ?", (replica,)
                    )
                ]
                conn.execute("DELETE FROM holds WHERE replica_id = ?", (replica,))
                for batch_id in held:
                    conn.execute(
                        "UPDATE batches SET last_received_at = ? WHERE id = ?"
                        " AND state = 'receiving'",
                        (now, batch_id),
                    )
                holds += len(held)
        return {"batches": batches, "deliveries": deliveries, "holds": holds}

    def _hold_in_database(self, conn: Any, association: str, batch_ids: set[int]) -> None:
        for batch_id in sorted(batch_ids):
            conn.execute(
                "INSERT OR IGNORE INTO holds (replica_id, association, batch_id) VALUES (?, ?, ?)",
                (self.replica_id, association, batch_id),
            )

    def _held_by_live_replicas(self, conn: Any) -> set[int]:
        """Batches an open association of another live replica holds."""
        rows = conn.execute(
            "SELECT h.batch_id FROM holds h JOIN replicas r ON r.replica_id = h.replica_id"
            " WHERE r.heartbeat_at >= ? AND h.replica_id != ?",
            (time.time() - self.lease_seconds, self.replica_id),
        )
        return {r[0] for r in rows}

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica with its last heartbeat (seconds ago) and what it holds now."""
        now = time.time()
        rows = self.query(
            "SELECT replica_id, host, port, pid, started_at, heartbeat_at FROM replicas"
            " ORDER BY replica_id"
        )
        for row in rows:
            beat = row.pop("heartbeat_at")
            row["heartbeat_seconds_ago"] = round(now - beat, 1) if beat is not None else None
            row["alive"] = beat is not None and now - beat <= self.lease_seconds
            row["processing"] = self.query(
                "SELECT COUNT(*) AS n FROM batches WHERE claimed_by = ? AND state = 'processing'",
                (row["replica_id"],),
            )[0]["n"]
            row["forwarding"] = self.query(
                "SELECT COUNT(*) AS n FROM deliveries WHERE claimed_by = ? AND state = 'pending'",
                (row["replica_id"],),
            )[0]["n"]
        return rows
