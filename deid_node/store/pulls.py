"""Pull jobs in the database: a job, its input lines and the studies each line found.

The input lines hold identifying values (accession numbers, patient IDs): they are kept here,
for the operator, and returned only by `pull_job_detail`; nothing else returns them.
"""

from __future__ import annotations

import json
from typing import Any

from deid_node.modes import DEFAULT_PROJECT
from deid_node.store.base import StoreBase
from deid_node.store.schema import utcnow

PULL_JOB_OPEN = ("queued", "running")
PULL_JOB_FINAL = ("done", "failed", "cancelled")


class PullQueries(StoreBase):
    def create_pull_job(
        self, source: str, queries: list[dict[str, str]], project: str = DEFAULT_PROJECT
    ) -> int:
        now = utcnow()
        with self.transaction() as conn:
            job_id = conn.execute(
                "INSERT INTO pull_jobs (source, project, state, cancel_requested, created_at,"
                " updated_at) VALUES (?, ?, 'queued', 0, ?, ?)",
                (source, project, now, now),
            ).lastrowid
            conn.executemany(
                "INSERT INTO pull_lines (job_id, line_no, query, state) VALUES (?, ?, ?, 'pending')",
                [(job_id, n, json.dumps(q, sort_keys=True)) for n, q in enumerate(queries, 1)],
            )
        return int(job_id)

    def request_pull_cancel(self, job_id: int) -> bool:
        """Ask the node to stop a job; False when it is unknown or already over."""
        with self.transaction() as conn:
            changed = conn.execute(
                "UPDATE pull_jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?"
                " AND state IN ('queued', 'running')",
                (utcnow(), job_id),
            ).rowcount
        return bool(changed)

    def open_pull_jobs(self) -> list[dict[str, Any]]:
        return self.query(
            "SELECT id, source, project, state, cancel_requested FROM pull_jobs"
            " WHERE state IN ('queued', 'running') ORDER BY id"
        )

    def set_pull_job_state(self, job_id: int, state: str, error: str | None = None) -> None:
        now = utcnow()
        final = now if state in PULL_JOB_FINAL else None
        with self.transaction() as conn:
            conn.execute(
                "UPDATE pull_jobs SET state = ?, error = ?, updated_at = ?,"
                " finished_at = COALESCE(?, finished_at) WHERE id = ?",
                (state, error, now, final, job_id),
            )
            if state == "cancelled":
                conn.execute(
                    "UPDATE pull_studies SET state = 'cancelled', updated_at = ?"
                    " WHERE job_id = ? AND state IN ('pending', 'retrieving')",
                    (now, job_id),
                )
                conn.execute(
                    "UPDATE pull_lines SET state = 'cancelled' WHERE job_id = ? AND state = 'pending'",
                    (job_id,),
                )

    def pending_pull_lines(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT id, line_no, query FROM pull_lines WHERE job_id = ? AND state = 'pending'"
            " ORDER BY line_no",
            (job_id,),
        )
        return [{**r, "query": json.loads(r["query"])} for r in rows]

    def record_pull_line(
        self,
        job_id: int,
        line_id: int,
        studies: list[tuple[str, int | None]],
        *,
        error: str | None = None,
    ) -> int:
        """What a line's C-FIND found: its studies (UID, expected instances), 'not_found' when
        none, 'failed' with an error. A study already in the job is not added twice."""
        state = "failed" if error else ("found" if studies else "not_found")
        now = utcnow()
        added = 0
        with self.transaction() as conn:
            conn.execute(
                "UPDATE pull_lines SET state = ?, error = ? WHERE id = ?", (state, error, line_id)
            )
            for study_uid, expected in studies:
                known = conn.execute(
                    "SELECT 1 FROM pull_studies WHERE job_id = ? AND study_uid = ?",
                    (job_id, study_uid),
                ).fetchone()
                if known:
                    continue
                conn.execute(
                    "INSERT INTO pull_studies (job_id, line_id, study_uid, state, expected,"
                    " completed, failed, attempts, next_at, updated_at)"
                    " VALUES (?, ?, ?, 'pending', ?, 0, 0, 0, ?, ?)",
                    (job_id, line_id, study_uid, expected, now, now),
                )
                added += 1
        return added

    def due_pull_studies(self, job_id: int, limit: int) -> list[dict[str, Any]]:
        return self.query(
            "SELECT id, study_uid, expected, attempts FROM pull_studies WHERE job_id = ?"
            " AND state = 'pending' AND next_at <= ? ORDER BY id LIMIT ?",
            (job_id, utcnow(), limit),
        )

    def update_pull_study(self, study_id: int, state: str, **fields: Any) -> None:
        allowed = {"completed", "failed", "attempts", "next_at", "error"}
        assert set(fields) <= allowed, fields
        sets = "".join(f", {key} = :{key}" for key in fields)
        with self.transaction() as conn:
            conn.execute(
                f"UPDATE pull_studies SET state = :state, updated_at = :now{sets} WHERE id = :id",
                {"state": state, "now": utcnow(), "id": study_id, **fields},
            )

    def pull_job_open_work(self, job_id: int) -> int:
        """Lines not yet resolved plus studies not yet final."""
        row = self.query(
            "SELECT (SELECT COUNT(*) FROM pull_lines WHERE job_id = :j AND state = 'pending')"
            " + (SELECT COUNT(*) FROM pull_studies WHERE job_id = :j"
            " AND state IN ('pending', 'retrieving')) AS n",
            {"j": job_id},
        )
        return int(row[0]["n"])

    def recover_pull_jobs(self) -> int:
        """At start: a study that was being retrieved when the node stopped is retrieved again."""
        with self.transaction() as conn:
            return conn.execute(
                "UPDATE pull_studies SET state = 'pending', updated_at = ?"
                " WHERE state = 'retrieving'",
                (utcnow(),),
            ).rowcount

    def pull_jobs(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Jobs with counts and study UIDs; no input value."""
        where, params = ("WHERE id = ?", (job_id,)) if job_id is not None else ("", ())
        jobs = self.query(
            "SELECT id, source, project, state, cancel_requested, created_at, finished_at, error"
            f" FROM pull_jobs {where} ORDER BY id",
            params,
        )
        for job in jobs:
            lines = {
                r["state"]: r["n"]
                for r in self.query(
                    "SELECT state, COUNT(*) AS n FROM pull_lines WHERE job_id = ? GROUP BY state",
                    (job["id"],),
                )
            }
            studies = self.query(
                "SELECT study_uid, state, expected, completed, failed, attempts, error"
                " FROM pull_studies WHERE job_id = ? ORDER BY id",
                (job["id"],),
            )
            by_state: dict[str, int] = {}
            for study in studies:
                by_state[study["state"]] = by_state.get(study["state"], 0) + 1
            job["lines"] = {"total": sum(lines.values()), **lines}
            job["studies"] = {"found": len(studies), **by_state}
            job["instances_retrieved"] = sum(s["completed"] or 0 for s in studies)
            job["series_forwarded"] = self.query(
                "SELECT COUNT(DISTINCT b.series_uid) AS n FROM batches b"
                " JOIN series s ON s.series_uid = b.series_uid WHERE b.state = 'forwarded'"
                " AND b.project IS (SELECT project FROM pull_jobs WHERE id = ?1)"
                " AND s.study_uid IN (SELECT study_uid FROM pull_studies WHERE job_id = ?1)",
                (job["id"],),
            )[0]["n"]
            job["study_list"] = studies
        return jobs

    def pull_job_detail(self, job_id: int) -> list[dict[str, Any]]:
        """Each input line (its identifying query keys) and the study UIDs it found."""
        lines = self.query(
            "SELECT id, line_no, query, state, error FROM pull_lines WHERE job_id = ?"
            " ORDER BY line_no",
            (job_id,),
        )
        for line in lines:
            line["query"] = json.loads(line["query"])
            line["study_uids"] = [
                r["study_uid"]
                for r in self.query(
                    "SELECT study_uid FROM pull_studies WHERE line_id = ? ORDER BY id",
                    (line.pop("id"),),
                )
            ]
        return lines

    def pull_cancel_requested(self, job_id: int) -> bool:
        rows = self.query("SELECT cancel_requested FROM pull_jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def pull_studies_waiting(self, job_id: int) -> int:
        """Studies still to retrieve (due now or after their backoff)."""
        rows = self.query(
            "SELECT COUNT(*) AS n FROM pull_studies WHERE job_id = ? AND state = 'pending'",
            (job_id,),
        )
        return int(rows[0]["n"])
