"""The spool on disk: received bytes under tmp/, originals under spool/, and their clean-up."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from deid_node.files import adopt_durably, fsync_dirs
from deid_node.store.base import StoreBase


class SpoolFiles(StoreBase):
    def tmp_write(self, data: bytes) -> Path:
        """Put received bytes in a file under tmp/ (adopted into the spool or quarantine next)."""
        path = self.tmp_dir / f"{uuid.uuid4().hex}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path

    def spool_adopt(self, received: Path) -> Path:
        """Move a received file into the spool durably: fsync it, rename, fsync the folder."""
        name = uuid.uuid4().hex
        return adopt_durably(received, self.data_dir / "spool" / name[:2] / f"{name}.dcm")

    def spool_link(self, original: Path) -> Path:
        """Another name in the spool for an adopted original (one per project that takes it:
        each row owns a name it may delete), durable: hard link, then fsync its folder."""
        name = uuid.uuid4().hex
        path = self.data_dir / "spool" / name[:2] / f"{name}.dcm"
        os.link(original, path)
        fsync_dirs([path.parent])
        return path

    def remove_stale_tmp(self, older_than_seconds: float) -> int:
        """Delete partial receipts in tmp/ (never acknowledged: an association that aborted
        mid-dataset, or a crash mid-receive). They hold patient data and nothing refers to them."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # adopted or removed meanwhile
        return removed

    def _move_orphan_spool_files(self) -> int:
        """Spool files with no row: moved into the spool by a receipt whose commit never
        happened (so never acknowledged). Only at start, under the data folder's lock, when no
        receipt is in flight. Moved aside to quarantine/orphans/, never deleted: a file the
        database does not know may still be someone's only copy. Not on a folder replicas
        share: another replica's receipt may be in flight."""
        if self.shared:
            return 0
        known = {
            r["spool_path"]
            for r in self.query("SELECT spool_path FROM instances WHERE spool_path IS NOT NULL")
        }
        orphans = self.data_dir / "quarantine" / "orphans"
        moved = 0
        for path in sorted((self.data_dir / "spool").rglob("*.dcm")):
            if self.relative(path) in known or str(path) in known:
                continue
            orphans.mkdir(mode=0o700, exist_ok=True)
            adopt_durably(path, orphans / path.name)
            moved += 1
        if moved:
            fsync_dirs([orphans.parent])
        return moved

    def release_originals(self, batch_id: int) -> int:
        """Delete the spool copies (originals) of a batch that reached a final state."""
        removed = 0
        for row in self.query(
            "SELECT id, spool_path, deid_path FROM instances WHERE batch_id = ?", (batch_id,)
        ):
            for key in ("spool_path", "deid_path"):
                if row[key] and self.absolute(row[key]).exists():
                    # Another replica may clean the same batch at the same moment.
                    self.absolute(row[key]).unlink(missing_ok=True)
                    removed += 1
        return removed

    def batches_to_clean(self, older_than_hours: float) -> list[int]:
        cutoff = datetime.fromtimestamp(time.time() - older_than_hours * 3600, UTC).isoformat()
        return [
            r["id"]
            for r in self.query(
                "SELECT id FROM batches WHERE state IN ('forwarded', 'rejected') AND finished_at <= ?"
                " AND EXISTS (SELECT 1 FROM instances i WHERE i.batch_id = batches.id AND"
                " (i.spool_path IS NOT NULL))",
                (cutoff,),
            )
        ]

    def forget_files(self, batch_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE instances SET spool_path = NULL, deid_path = NULL WHERE batch_id = ?",
                (batch_id,),
            )
