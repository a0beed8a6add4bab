"""The spool on disk: received bytes under tmp/, originals under spool/, and their clean-up."""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deid_node.files import adopt_durably, fsync_dirs
from deid_node.log import get_logger
from deid_node.store.base import StoreBase

log = get_logger("deid_node.store")

# fsyncs of received files that run while their rows commit (one per receipt in flight; more
# associations than threads wait their turn). Threads start on first use.
_FLUSHERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spool-fsync")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFlush:
    """The fsyncs of a spool file and of its folder, running at once in other threads (both
    are needed: its bytes, and the name the rename gave it)."""

    def __init__(self, *futures: Future[None]) -> None:
        self._futures = futures

    def wait(self) -> None:
        wait(self._futures)

    def result(self) -> None:
        """Once both returned; the first one's error if either failed."""
        self.wait()
        for future in self._futures:
            future.result()


class SpoolFiles(StoreBase):
    def __init__(self, data_dir: Path, **options: Any) -> None:
        super().__init__(data_dir, **options)
        # Markers of overlapped receipts whose file and row are both durable, to delete.
        self._confirmed_receipts: list[str] = []
        # The overlapped receipt whose block runs (under the store's lock): its row's
        # transaction writes its marker (`mark_receipt_in_flight`) and deletes these markers.
        self._receipt_in_flight: tuple[Path, str, str] | None = None
        self._confirmed_deleting: list[str] = []

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

    @contextmanager
    def overlapped_receipt(
        self, received: Path, series_uid: str, sop_uid: str
    ) -> Iterator[Path | None]:
        """Move a received file into the spool for a row that may commit while the file's
        fsync runs (`flush_spool_file`): the two disk flushes overlap instead of following
        each other (issue 17). Run `record_instance` (one row) inside the block; wait for the
        flush after it (outside the store's lock); acknowledge only once both are done.

        Yields None where the receipt must go the serial way (`spool_adopt`, then the row):
        on PostgreSQL; when the series already has a row of this SOP instance (recording it
        would replace, or drop, a file of an earlier copy that may have been acknowledged);
        across file systems. Holds the store's lock until the block ends, so that no other
        receipt of this SOP instance records in between.

        A crash may leave the row durable and the file not: the row's transaction also
        commits a marker (receipts_in_flight, `mark_receipt_in_flight`), so that neither is
        durable without the other, and start-up checks the file of every marked row
        (`_drop_unconfirmed_receipts`). A crash before that commit leaves the moved file
        without a row: an orphan, moved aside at start-up."""
        if self.shared:
            yield None
            return
        with self._lock:
            known = self.query(
                "SELECT 1 FROM instances WHERE series_uid = ? AND sop_uid = ? LIMIT 1",
                (series_uid, sop_uid),
            )
            if known:
                yield None
                return
            name = uuid.uuid4().hex
            path = self.data_dir / "spool" / name[:2] / f"{name}.dcm"
            try:
                os.replace(received, path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                yield None
                return
            self._receipt_in_flight = (path, series_uid, sop_uid)
            try:
                yield path
            except BaseException:
                # The row's transaction rolled back (or never ran): the markers it deleted
                # are still there, to go with the next receipt's.
                self._confirmed_receipts[:0] = self._confirmed_deleting
                raise
            finally:
                self._receipt_in_flight = None
                self._confirmed_deleting = []

    def mark_receipt_in_flight(self, conn: Any, spool_path: Path, rows: int) -> None:
        """In `record_instance`'s transaction: when its file is the one an `overlapped_receipt`
        block moved (and may not be on disk yet), the marker that start-up checks, in the same
        commit as the row; the markers of confirmed receipts go. One row only: a marker names
        one file."""
        in_flight = self._receipt_in_flight
        if in_flight is None or in_flight[0] != spool_path:
            return
        if rows != 1:
            raise ValueError("an overlapped receipt records one row")
        confirmed, self._confirmed_receipts = self._confirmed_receipts, []
        self._confirmed_deleting = confirmed
        if confirmed:
            conn.executemany(
                "DELETE FROM receipts_in_flight WHERE spool_path = ?", [(p,) for p in confirmed]
            )
        conn.execute(
            "INSERT INTO receipts_in_flight (spool_path, series_uid, sop_uid) VALUES (?, ?, ?)",
            (self.relative(spool_path), in_flight[1], in_flight[2]),
        )

    def flush_spool_file(self, path: Path) -> SpoolFlush:
        """fsync a file moved by `overlapped_receipt` and its folder, each in another thread.
        The descriptor is opened here: the file may be unlinked before the thread runs."""
        fd = os.open(path, os.O_RDONLY)
        try:
            own = _FLUSHERS.submit(_fsync_and_close, fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            folder = _FLUSHERS.submit(fsync_dirs, [path.parent])
        except BaseException:
            wait((own,))
            raise
        return SpoolFlush(own, folder)

    def receipt_confirmed(self, path: Path) -> None:
        """The file of an overlapped receipt is durable, as is its row: its marker may go
        (deleted with the next marker's insert; one left at a stop is checked at start-up)."""
        with self._lock:
            self._confirmed_receipts.append(self.relative(path))

    def _drop_unconfirmed_receipts(self) -> int:
        """At start, under the data folder's lock: a marked receipt whose row was committed but
        whose file is missing or differs from the row's SHA-256 was never acknowledged (Success
        waits for the file's fsync): its row goes (and its batch, if it held nothing else);
        the file, now without a row, is moved aside with the other orphans. A file that is
        whole is fsynced again (a crash of the process alone leaves it in the page cache).
        Returns how many rows were dropped."""
        self._confirmed_receipts = []
        markers = self.query("SELECT spool_path, series_uid, sop_uid FROM receipts_in_flight")
        dropped = 0
        with self.transaction() as conn:
            for marker in markers:
                rows = conn.execute(
                    "SELECT id, batch_id, sha256, state FROM instances"
                    " WHERE series_uid = ? AND sop_uid = ? AND spool_path = ?",
                    (marker["series_uid"], marker["sop_uid"], marker["spool_path"]),
                ).fetchall()
                if not rows:
                    continue  # the row never committed: its file (if any) is an orphan
                path = self.absolute(marker["spool_path"])
                if _whole(path, rows[0][2]):
                    continue
                for instance_id, batch_id, _, state in rows:
                    if state not in ("received", "unrouted"):
                        log.error("unconfirmed_receipt_kept", instance_id=instance_id, state=state)
                        continue
                    conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
                    conn.execute(
                        "DELETE FROM batches WHERE id = ? AND state IN ('receiving', 'rejected')"
                        " AND NOT EXISTS (SELECT 1 FROM instances WHERE batch_id = ?)",
                        (batch_id, batch_id),
                    )
                    dropped += 1
            conn.execute("DELETE FROM receipts_in_flight")
        if dropped:
            log.warning("unconfirmed_receipts_dropped", rows=dropped)
        return dropped

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
        self._drop_unconfirmed_receipts()
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


def _whole(path: Path, sha256: str) -> bool:
    """The file is there with the bytes its row was recorded with; fsynced again if so."""
    try:
        if not sha256 or file_sha256(path) != sha256:
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except FileNotFoundError:
        return False
