"""Read-only queries: per-file reports (received and refused instances) and the node's status."""

from __future__ import annotations

import json
from typing import Any

from deid_node.report import unprocessed_report
from deid_node.store.base import StoreBase


class ReportQueries(StoreBase):
    def reports(
        self,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        since: str | None = None,
        failed: bool = False,
        project: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every file's report, oldest first. `project`: that project's rows only (refused
        and unrouted instances belong to none)."""
        where, params = ["i.report IS NOT NULL"], []
        if project:
            where.append("i.project = ?")
            params.append(project)
        if study_uid:
            where.append("i.study_uid = ?")
            params.append(study_uid)
        if series_uid:
            where.append("i.series_uid = ?")
            params.append(series_uid)
        if since:
            where.append("i.received_at >= ?")
            params.append(since)
        if failed:
            where.append(
                "(i.state = 'quarantined' OR b.state IN ('rejected', 'failed') OR b.passed = 0)"
            )
        rows = self.query(
            "SELECT i.report, b.state AS batch_state FROM instances i JOIN batches b ON b.id = i.batch_id"
            f" WHERE {' AND '.join(where)} ORDER BY i.received_at, i.id",
            tuple(params),
        )
        out = []
        for row in rows:
            report = json.loads(row["report"])
            report["series_state"] = row["batch_state"]
            if report.get("quarantine"):  # where it is now, wherever data_dir moved
                report["quarantine"] = str(self.absolute(report["quarantine"]))
            out.append(report)
        if not (study_uid or series_uid or project):
            out += self._refused_reports(since)
        return out

    def _refused_reports(self, since: str | None) -> list[dict[str, Any]]:
        """Instances the SCP refused, as reports: nothing of them left, `error` says why."""
        rows = self.query(
            "SELECT * FROM refused WHERE received_at >= ? ORDER BY received_at, id", (since or "",)
        )
        return [
            unprocessed_report(
                url=f"dicom://{r['calling_ae']}/{r['sop_uid']}",
                SOPInstanceUID=r["sop_uid"],
                calling_ae=r["calling_ae"],
                received_at=r["received_at"],
                error=r["reason"],
                dimse_status=f"0x{r['status']:04X}",
                quarantine=str(self.absolute(r["quarantine_path"]))
                if r["quarantine_path"]
                else None,
                series_state="refused",
            )
            | {"project": None}  # refused before any project took it
            for r in rows
        ]

    def status(self, project: str | None = None) -> dict[str, Any]:
        """Counts of batches by state, deliveries by destination and state, instances; and per
        project ("unrouted": instances no project took). `project`: that project's only."""
        scope, params = ("WHERE project = ?", (project,)) if project else ("", ())
        batches = {
            r["state"]: r["n"]
            for r in self.query(
                f"SELECT state, COUNT(*) AS n FROM batches {scope} GROUP BY state", params
            )
        }
        deliveries = self.query(
            "SELECT destination, state, COUNT(*) AS n, MAX(last_error) AS last_error FROM deliveries"
            f" WHERE batch_id IN (SELECT id FROM batches {scope}) GROUP BY destination, state",
            params,
        )
        instances = self.query(f"SELECT COUNT(*) AS n FROM instances {scope}", params)[0]["n"]
        status: dict[str, Any] = {
            "batches": batches,
            "deliveries": deliveries,
            "instances": instances,
        }
        if project:
            status["project"] = project
        else:
            per_project: dict[str, dict[str, Any]] = {}
            for r in self.query(
                "SELECT project, state, COUNT(*) AS n FROM batches GROUP BY project, state"
            ):
                name = r["project"] or "unrouted"
                per_project.setdefault(name, {"batches": {}})["batches"][r["state"]] = r["n"]
            for r in self.query("SELECT project, COUNT(*) AS n FROM instances GROUP BY project"):
                per_project.setdefault(r["project"] or "unrouted", {"batches": {}})["instances"] = (
                    r["n"]
                )
            status["projects"] = per_project
        return status
