"""The quarantine: refused and failed originals kept for the operator (owner-only), and the
report rows of instances the SCP refused."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from deid_node.files import adopt_durably, write_durably
from deid_node.store.base import StoreBase
from deid_node.store.schema import utcnow


class QuarantineFiles(StoreBase):
    def quarantine_file(self, received: Path) -> str | None:
        """Keep a refused or failed file for the operator, under quarantine/ (owner-only)."""
        target = self.data_dir / "quarantine" / f"{uuid.uuid4().hex}.dcm"
        try:
            if received.parent == self.data_dir / "spool" / received.parent.name:
                return str(adopt_durably(received, target))
            with received.open("rb") as src:
                write_durably(
                    target.with_suffix(".part"), target, lambda dst: shutil.copyfileobj(src, dst)
                )
            return str(target)
        except OSError:
            return None

    def quarantine_path_for(self, instance_id: int, current: Path | None = None) -> Path:
        """Where an instance that failed processing is kept: where it is when it is in the
        quarantine already (re-queued from there by `retry`), else a name of its own."""
        folder = self.data_dir / "quarantine"
        if current is not None and current.parent == folder:
            return current
        return folder / f"instance-{instance_id}.dcm"

    def move_to_quarantine(self, spooled: Path, target: Path) -> None:
        """Move a spooled original that could not be de-identified; idempotent."""
        if spooled != target and spooled.exists():
            adopt_durably(spooled, target)

    def _complete_quarantine_moves(self) -> int:
        """Quarantined instances whose move was cut off by a crash after the commit."""
        moved = 0
        for row in self.query(
            "SELECT spool_path, report FROM instances WHERE state = 'quarantined' AND spool_path IS NOT NULL"
        ):
            target = json.loads(row["report"]).get("quarantine")
            if not target:
                continue
            spooled, kept = self.absolute(row["spool_path"]), self.absolute(target)
            if spooled != kept and spooled.exists() and not kept.exists():
                self.move_to_quarantine(spooled, kept)
                moved += 1
        return moved

    def refused_copy_kept(self, sop_uid: str) -> bool:
        """Whether a refused row for this SOPInstanceUID already holds a copy still in the
        quarantine: a modality that retries a refusal (0xA7xx) does not fill the disk."""
        rows = self.query(
            "SELECT quarantine_path FROM refused WHERE sop_uid = ? AND quarantine_path IS NOT NULL",
            (sop_uid,),
        )
        return any(self.absolute(row["quarantine_path"]).exists() for row in rows)

    def record_refused(self, **row: Any) -> None:
        """A report row for an instance the SCP refused (with the DIMSE status and why)."""
        if row.get("quarantine_path"):
            row["quarantine_path"] = self.relative(row["quarantine_path"])
        row = {"received_at": utcnow(), **row}
        with self.transaction() as conn:
            conn.execute(
                f"INSERT INTO refused ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
