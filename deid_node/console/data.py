"""What the console shows and does, shared by its pages and its JSON API: reads through
store/metrics_queries.py, actions through the store, each action audited and logged."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import HTTPException

from deid_node.console.auth import Session
from deid_node.console.metrics import NodeView
from deid_node.log import get_logger
from deid_node.store import BATCH_STATES
from deid_node.store import metrics_queries as mq

log = get_logger("deid_node.console")
PAGE = 50


class ConsoleData:
    def __init__(self, view: NodeView) -> None:
        self.view = view
        self.store = view.store

    def overview(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        today = now.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
        hour_ago = (now - timedelta(hours=1)).isoformat(timespec="milliseconds")
        counts = mq.overview_counts(self.store)
        per_minute = mq.received_per_minute(self.store, hour_ago)
        return {
            "received_today": mq.received_since(self.store, today),
            "series_by_state": {r["state"]: r["n"] for r in counts["series"]},
            "destinations": [
                {
                    "name": name,
                    "up": up,
                    "pending": sum(
                        r["n"]
                        for r in counts["deliveries"]
                        if r["destination"] == name and r["state"] == "pending"
                    ),
                }
                for name, up in sorted(self.view.destinations_up().items())
            ],
            "quarantined": mq.quarantine_page(self.store, limit=1)[1],
            "free_disk_bytes": shutil.disk_usage(self.store.data_dir).free,
            "received_last_hour": per_minute,
        }

    def series(
        self,
        state: str | None,
        calling_ae: str | None,
        page: int,
        since: str | None = None,
        until: str | None = None,
        project: str | None = None,
    ) -> dict[str, Any]:
        if state and state not in BATCH_STATES:
            raise HTTPException(422, f"state: one of {', '.join(BATCH_STATES)}")
        for name, value in (("since", since), ("until", until)):
            if value:
                try:
                    date.fromisoformat(value)
                except ValueError:
                    raise HTTPException(422, f"{name}: a date YYYY-MM-DD") from None
        rows, total = mq.series_page(
            self.store,
            state=state,
            calling_ae=calling_ae,
            since=since,
            until=until,
            project=project,
            limit=PAGE,
            offset=(page - 1) * PAGE,
        )
        return {
            "items": rows,
            "total": total,
            "page": page,
            "pages": max(1, -(-total // PAGE)),
            "projects": mq.project_names(self.store),
        }

    def detail(self, uid: str) -> dict[str, Any]:
        detail = mq.series_detail(self.store, uid)
        if detail is None:
            raise HTTPException(404, "no such series")
        return detail

    def quarantine(self, page: int) -> dict[str, Any]:
        rows, total = mq.quarantine_page(self.store, limit=PAGE, offset=(page - 1) * PAGE)
        for row in rows:
            # Held for pixel review: frame 0 as it would leave, the regions blanked, outlined.
            row["image"] = f"/api/v1/quarantine/{row['id']}/image.png" if row["review"] else None
        refused, refused_total = mq.refused_page(self.store, limit=PAGE, offset=(page - 1) * PAGE)
        pages = max(1, -(-max(total, refused_total) // PAGE))
        return {
            "items": rows,
            "total": total,
            "refused": refused,
            "refused_total": refused_total,
            "page": page,
            "pages": pages,
        }

    def audit(self, page: int) -> dict[str, Any]:
        rows, total = mq.audit_page(self.store, limit=PAGE, offset=(page - 1) * PAGE)
        return {"items": rows, "total": total, "page": page, "pages": max(1, -(-total // PAGE))}

    def act_on_quarantine(self, session: Session, instance_id: int, action: str) -> dict[str, Any]:
        row = mq.quarantined_instance(self.store, instance_id)
        if row is None:
            raise HTTPException(404, "no such quarantined file (discarded or retried already?)")
        if action == "reprocess":
            # That file's project only: the same series in another project is its own.
            result = self.store.retry_processing(row["series_uid"], row.get("project"))
            self.view.request_reprocess()
            detail = f"{result['instances']} instance(s) re-queued"
        elif action == "release":
            # Under series policy "all" the instances withheld because of this one go with it
            # (node: join_withheld): the series leaves whole once the released file passes.
            if not mq.release_quarantined(self.store, instance_id):
                raise HTTPException(
                    409,
                    "only a file held for pixel review (burned-in text) can be released; "
                    "re-process or discard this one",
                )
            self.view.request_reprocess()
            detail = "released after review: processed again without the pixel review hold"
        elif action == "discard":
            mq.discard_quarantined(self.store, instance_id)
            detail = "original deleted"
        else:
            raise HTTPException(404, "unknown action (release, reprocess or discard)")
        mq.record_audit(
            self.store,
            user=session.user,
            role=session.role,
            action=f"quarantine.{action}",
            target=row["sop_uid"],
            detail=detail,
        )
        log.info("console_action", user=session.user, action=action, sop_uid=row["sop_uid"])
        return {"id": instance_id, "action": action, "detail": detail}

    def discard_refused(self, session: Session, refused_id: int) -> dict[str, Any]:
        row = mq.discard_refused(self.store, refused_id)
        if row is None:
            raise HTTPException(404, "no such refused instance kept")
        mq.record_audit(
            self.store,
            user=session.user,
            role=session.role,
            action="refused.discard",
            target=row["sop_uid"],
            detail="kept bytes deleted",
        )
        log.info("console_action", user=session.user, action="discard", sop_uid=row["sop_uid"])
        return {"id": refused_id, "action": "discard", "detail": "kept bytes deleted"}

    def retry_series(self, session: Session, uid: str) -> dict[str, Any]:
        self.detail(uid)
        processing = self.store.retry_processing(uid)
        deliveries = self.store.retry_series(uid)
        self.view.request_reprocess()
        detail = (
            f"{deliveries} deliveries, {processing['batches']} rounds,"
            f" {processing['instances']} instances re-queued"
        )
        mq.record_audit(
            self.store,
            user=session.user,
            role=session.role,
            action="series.retry",
            target=uid,
            detail=detail,
        )
        log.info("console_action", user=session.user, action="retry", series_uid=uid)
        return {"series_uid": uid, "action": "retry", "detail": detail}
