"""Receiving: the rows of received instances, the batches they open or join, the associations
that hold a batch open, and when a batch is stable enough to leave `receiving` for `complete`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deid_node.modes import DEFAULT_PROJECT
from deid_node.report import unprocessed_report
from deid_node.store.replicas import ReplicaQueries
from deid_node.store.schema import utcnow


@dataclass(frozen=True)
class Receipt:
    """What the SCP learned about one received instance (header only; no patient values)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    calling_ae: str
    peer: str
    sha256: str = ""  # of the received file: tells a re-send from a corrected instance


@dataclass(frozen=True)
class StoredInstance:
    id: int
    batch_id: int
    round: int
    duplicate: bool


class ReceivingQueries(ReplicaQueries):
    def __init__(self, data_dir: Path, **options: Any) -> None:
        super().__init__(data_dir, **options)
        # Receiving batches fed by an association still open (association -> batch ids): not
        # complete until it closes. In memory: after a restart no association is open.
        self._held: dict[Hashable, set[int]] = {}

    # -- receive --------------------------------------------------------------------------

    def record_instance(
        self,
        receipt: Receipt,
        spool_path: Path,
        size: int,
        *,
        association: Hashable | None = None,
        projects: Sequence[str] = (DEFAULT_PROJECT,),
    ) -> StoredInstance:
        """Commit the rows of a received instance, one per project that takes it, into each
        project's open batch of its series, in one transaction (acknowledged for all or none).
        Each project's row owns a name of its own for the original (hard links). No project
        (unrouted): acknowledged and kept, reported with project null, never processed.

        A SOPInstanceUID already in the open batch is replaced (the modality re-sent it);
        the earlier spool file is deleted after the commit. The same bytes re-sent after their
        batch was processed are acknowledged and dropped (idempotent): nothing is processed or
        forwarded twice, unless that copy was quarantined: then it is a new attempt (the cause
        was fixed), processed in the next round. Different bytes under a known SOPInstanceUID
        start a late round. association: the open association that delivered it; its batch is
        not complete before `association_closed`. Returns the first project's row. Inside an
        `overlapped_receipt` block, the receipt's marker commits in the same transaction.
        """
        now, stamp = time.time(), utcnow()
        targets: list[str | None] = list(dict.fromkeys(projects)) or [None]
        paths = [spool_path]
        try:
            paths += [self.spool_link(spool_path) for _ in targets[1:]]
            with self.transaction() as conn:
                self.mark_receipt_in_flight(conn, spool_path, len(targets))
                outcomes = [
                    self._record_one(conn, receipt, project, path, size, now, stamp)
                    for project, path in zip(targets, paths, strict=True)
                ]
                if association is not None:
                    fed = {
                        stored.batch_id
                        for (stored, drop, _), project in zip(outcomes, targets, strict=True)
                        if project is not None and not drop
                    }
                    with self._lock:
                        self._held.setdefault(association, set()).update(fed)
                    if self.shared:
                        self._hold_in_database(conn, _key(association), fed)
        except BaseException:
            for path in paths[1:]:
                path.unlink(missing_ok=True)
            raise
        for path, (_, drop, old_path) in zip(paths, outcomes, strict=True):
            if drop:
                path.unlink(missing_ok=True)
            elif old_path and old_path != self.relative(path):
                self.absolute(old_path).unlink(missing_ok=True)
        return outcomes[0][0]

    def _record_one(
        self,
        conn: Any,
        receipt: Receipt,
        project: str | None,
        spool_path: Path,
        size: int,
        now: float,
        stamp: str,
    ) -> tuple[StoredInstance, bool, str | None]:
        """One project's row: (the row, drop the file as a known copy, an earlier file to
        delete after the commit)."""
        # Replicas receiving one series at once add to its batch one after the other.
        self.engine.lock_key(conn, f"{project}/{receipt.series_uid}")
        if receipt.sha256:
            seen = conn.execute(
                "SELECT i.id, i.batch_id, b.round FROM instances i JOIN batches b ON b.id = i.batch_id"
                " WHERE i.series_uid = ? AND i.sop_uid = ? AND i.sha256 = ? AND i.project IS ?"
                " AND b.state NOT IN ('receiving', 'failed') AND i.state != 'quarantined'",
                (receipt.series_uid, receipt.sop_uid, receipt.sha256, project),
            ).fetchone()
            if seen is not None:
                return StoredInstance(seen[0], seen[1], seen[2], duplicate=True), True, None
        conn.execute(
            "INSERT OR IGNORE INTO series (series_uid, study_uid, created_at) VALUES (?, ?, ?)",
            (receipt.series_uid, receipt.study_uid, stamp),
        )
        # Unrouted instances of a series wait in one batch of no project, final from the start
        # (rejected): kept for retention_hours from the last one, never processed.
        row = conn.execute(
            "SELECT id, round FROM batches WHERE series_uid = ? AND project IS ? AND state = ?"
            f"{self.engine.for_update()}",
            (receipt.series_uid, project, "receiving" if project is not None else "rejected"),
        ).fetchone()
        if row is None:
            last = conn.execute(
                "SELECT COALESCE(MAX(round), 0) FROM batches WHERE series_uid = ? AND project IS ?",
                (receipt.series_uid, project),
            ).fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO batches (project, series_uid, round, state, calling_ae, created_at,"
                " last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    project,
                    receipt.series_uid,
                    last + 1,
                    "receiving" if project is not None else "rejected",
                    receipt.calling_ae,
                    stamp,
                    now,
                ),
            )
            batch_id, round_ = cursor.lastrowid, last + 1
        else:
            batch_id, round_ = row
        conn.execute("UPDATE batches SET last_received_at = ? WHERE id = ?", (now, batch_id))
        existing = conn.execute(
            "SELECT id, spool_path FROM instances WHERE batch_id = ? AND sop_uid = ?",
            (batch_id, receipt.sop_uid),
        ).fetchone()
        url = f"dicom://{receipt.calling_ae}/{receipt.sop_uid}"
        fields = (
            receipt.series_uid,
            receipt.study_uid,
            receipt.sop_class_uid,
            receipt.transfer_syntax,
            receipt.calling_ae,
            receipt.peer,
            url,
            self.relative(spool_path),
            size,
            stamp,
            receipt.sha256,
            "received" if project is not None else "unrouted",
            None if project is not None else json.dumps(_unrouted_report(receipt, url, stamp)),
        )
        old_path = None
        if existing:
            instance_id, old_path = existing
            conn.execute(
                "UPDATE instances SET series_uid=?, study_uid=?, sop_class_uid=?, transfer_syntax=?,"
                " calling_ae=?, peer=?, url=?, spool_path=?, size=?, received_at=?, sha256=?,"
                " state=?, report=? WHERE id=?",
                (*fields, instance_id),
            )
        else:
            cursor = conn.execute(
                "INSERT INTO instances (series_uid, study_uid, sop_class_uid, transfer_syntax,"
                " calling_ae, peer, url, spool_path, size, received_at, sha256, state, report,"
                " batch_id, sop_uid, project) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*fields, batch_id, receipt.sop_uid, project),
            )
            instance_id = cursor.lastrowid
        if project is None:
            conn.execute(
                "UPDATE batches SET passed = 0, finished_at = ?, summary = ? WHERE id = ?",
                (stamp, json.dumps({"outcome": "unrouted"}), batch_id),
            )
        stored = StoredInstance(instance_id, batch_id, round_, duplicate=existing is not None)
        return stored, False, old_path

    # -- series state ---------------------------------------------------------------------

    def association_closed(self, association: Hashable) -> list[int]:
        """The association was released, aborted or lost: the batches it fed become stable
        `stable_seconds` from now (unless another open association holds them too)."""
        with self._lock:
            ids = self._held.pop(association, set())
            if ids:
                self._restart_stable_clock(ids, _key(association))
        return sorted(ids)

    def _restart_stable_clock(self, ids: set[int], association: str) -> None:
        with self.transaction() as conn:
            _restart_clocks(conn, ids)
            if self.shared:
                conn.execute(
                    "DELETE FROM holds WHERE replica_id = ? AND association = ?",
                    (self.replica_id, association),
                )

    def heartbeat(self) -> None:
        """The replica's heartbeat (ReplicaQueries.heartbeat); then this replica's holds whose
        association is no longer open here are let go. Their release failed (the database was
        unreachable when the association closed), and a live replica's hold keeps its series
        from completing on every replica: three replicas whose associations closed during a
        PostgreSQL restart held one series back from each other for good."""
        super().heartbeat()
        if not self.shared:
            return
        with self.transaction() as conn:  # the store's lock: `_held` cannot change meanwhile
            open_keys = {_key(association) for association in self._held}
            stale = [
                (association, batch_id)
                for association, batch_id in conn.execute(
                    "SELECT association, batch_id FROM holds WHERE replica_id = ?",
                    (self.replica_id,),
                ).fetchall()
                if association not in open_keys
            ]
            for association in sorted({association for association, _ in stale}):
                conn.execute(
                    "DELETE FROM holds WHERE replica_id = ? AND association = ?",
                    (self.replica_id, association),
                )
            if stale:  # stable `stable_seconds` from now, as after a close
                _restart_clocks(conn, {batch_id for _, batch_id in stale})

    def _held_batches(self) -> set[int]:
        """Batch ids an open association holds. An association whose thread ended without a
        close event reaching us (it cannot hold a batch forever) is let go here."""
        with self._lock:
            for association in [a for a in self._held if _ended(a)]:
                self.association_closed(association)
            return set().union(*self._held.values()) if self._held else set()

    def complete_stable_batches(
        self, stable_seconds: float, per_project: Mapping[str, float] | None = None
    ) -> list[int]:
        """Move batches with no instance for their project's stable seconds (`per_project`,
        else `stable_seconds`), and no open association that delivered to them, from receiving
        to complete."""
        now = time.time()
        held = self._held_batches()
        per_project = per_project or {}
        with self.transaction() as conn:
            if self.shared:
                held |= self._held_by_live_replicas(conn)
            candidates = [
                (batch_id, now - per_project.get(project, stable_seconds))
                for batch_id, project, last in conn.execute(
                    "SELECT id, project, last_received_at FROM batches WHERE state = 'receiving'"
                )
                if batch_id not in held and last <= now - per_project.get(project, stable_seconds)
            ]
            # Guarded: a series is completed once, by one replica, and not while an instance
            # another replica just added restarted its clock.
            ids = [
                batch_id
                for batch_id, cutoff in candidates
                if conn.execute(
                    "UPDATE batches SET state = 'complete', completed_at = ? WHERE id = ?"
                    " AND state = 'receiving' AND last_received_at <= ?",
                    (utcnow(), batch_id, cutoff),
                ).rowcount
            ]
        return ids

    def oldest_receiving(self) -> float | None:
        """When the least recently fed receiving batch that no open association holds got its
        last instance, or its association closed (time.time())."""
        times = [last for last, _ in self._receiving_not_held()]
        return min(times) if times else None

    def next_stable_at(
        self, stable_seconds: float, per_project: Mapping[str, float] | None = None
    ) -> float | None:
        """When the next receiving batch no open association holds becomes stable
        (time.time()), each by its project's stable seconds."""
        per_project = per_project or {}
        times = [
            last + per_project.get(project, stable_seconds)
            for last, project in self._receiving_not_held()
        ]
        return min(times) if times else None

    def _receiving_not_held(self) -> list[tuple[float, str | None]]:
        held = self._held_batches()
        rows = self.query(
            "SELECT id, project, last_received_at FROM batches WHERE state = 'receiving'"
        )
        return [(r["last_received_at"], r["project"]) for r in rows if r["id"] not in held]


def _restart_clocks(conn: Any, ids: set[int]) -> None:
    """The receiving batches `ids` become stable `stable_seconds` from now."""
    marks = ",".join("?" * len(ids))
    conn.execute(
        f"UPDATE batches SET last_received_at = ? WHERE state = 'receiving' AND id IN ({marks})",
        (time.time(), *sorted(ids)),
    )


def _key(association: Hashable) -> str:
    """An open association's name in the database (unique while it is open): a pynetdicom
    association by identity, a name (tests, tools) as itself."""
    if isinstance(association, str):
        return association
    return f"{os.getpid()}-{id(association)}"


def _ended(association: Hashable) -> bool:
    """A pynetdicom association is a thread; anything else (a test's key) never ends here."""
    is_alive = getattr(association, "is_alive", None)
    return is_alive is not None and not is_alive()


UNROUTED = "unrouted: no project takes this instance (called AE title, calling AE title, match)"


def _unrouted_report(receipt: Receipt, url: str, stamp: str) -> dict[str, Any]:
    """The report of an instance no project took: kept, never processed or forwarded."""
    report = unprocessed_report(
        url=url,
        study_uid=receipt.study_uid,
        series_uid=receipt.series_uid,
        SOPInstanceUID=receipt.sop_uid,
        calling_ae=receipt.calling_ae,
        received_at=stamp,
        reason="unrouted",
        error=UNROUTED,
    )
    return {**report, "project": None}
