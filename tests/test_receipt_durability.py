"""A receipt's row may commit while its file's fsync runs (issue 17, ingest): Success still
waits for both, and a crash between the two leaves nothing that start-up does not repair.

Faults are real: os.fsync of the spool file held at a gate (the real fsync runs once the gate
opens), SQLite's write lock held by another connection, files cut short or removed on disk as a
crash would leave them. No module of ours is replaced.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from dicomgen import make_instance, write_series
from peers import free_port, wait_until
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from deid_node.config import NodeConfig
from deid_node.scp import StoreLimits, start_server
from deid_node.store import Receipt, Store
from deid_node.store.spool import file_sha256

BIG = 1 << 40


def rows(store: Store, sql: str = "SELECT id, batch_id, spool_path FROM instances") -> list:
    return store.query(sql)


class SpoolFsyncGate:
    """os.fsync of a file in the spool waits until `open()`; every other fsync goes through."""

    def __init__(self, spool: Path) -> None:
        self.spool = str(spool)
        self.real = os.fsync
        self.opened = threading.Event()
        self.waiting = threading.Event()
        self.done = threading.Event()

    def __call__(self, fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(self.spool) and target.endswith(".dcm"):
            self.waiting.set()
            if not self.opened.wait(30):
                raise TimeoutError("gate never opened")
            self.real(fd)
            self.done.set()
            return
        self.real(fd)

    def open(self) -> None:
        self.opened.set()


class Sender:
    """One C-STORE in a thread of its own; `status` once the node answered."""

    def __init__(self, port: int, ds) -> None:
        self.status: int | None = None
        self.answered = threading.Event()
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DEID_NODE")
        assert self.assoc.is_established
        self.thread = threading.Thread(target=self._send, args=(ds,), daemon=True)
        self.thread.start()

    def _send(self, ds) -> None:
        try:
            self.status = int(self.assoc.send_c_store(ds).Status)
        finally:
            self.answered.set()

    def finish(self) -> int | None:
        assert self.answered.wait(30), "no answer from the node"
        self.thread.join(10)
        self.assoc.release()
        return self.status


@pytest.fixture
def node(tmp_path):
    """The SCP in-process on a fresh data folder: (port, store)."""
    port = free_port()
    config = NodeConfig(host="127.0.0.1", port=port, data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(config.data_dir)
    server = start_server(config, store, StoreLimits(BIG, 0))
    yield port, store
    server.stop(5)
    store.close()


def test_success_waits_for_the_files_fsync_though_the_row_commits_first(node, monkeypatch):
    port, store = node
    gate = SpoolFsyncGate(store.data_dir / "spool")
    monkeypatch.setattr(os, "fsync", gate)
    sender = Sender(port, make_instance("CT"))
    try:
        assert gate.waiting.wait(30), "the spool file's fsync never started"
        # The row is committed while the file's fsync is held: the two run at once ...
        wait_until(lambda: rows(store), 10, 0.02, "row committed during the file's fsync")
        # ... and no Success before the file is on disk.
        assert not sender.answered.wait(0.5), "Success before the file's fsync returned"
        assert store.query("SELECT COUNT(*) AS n FROM receipts_in_flight")[0]["n"] == 1
    finally:
        gate.open()
    assert sender.finish() == 0x0000
    assert gate.done.is_set()


def test_success_waits_for_the_rows_commit(node, tmp_path):
    port, store = node
    # Another connection holds SQLite's write lock: the row cannot commit until it lets go.
    blocker = sqlite3.connect(store.db_path, isolation_level=None, timeout=5)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        sender = Sender(port, make_instance("CT"))
        # Neither marker nor row can commit: no answer, however long the lock is held. (Not
        # "wait for the file in tmp/ first": other node threads queue behind the lock too, and
        # under load the association thread itself may wait for one of them; a full run once
        # saw no file in 10 s.)
        assert not sender.answered.wait(3), "Success before the row was committed"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sender.finish() == 0x0000
    assert len(rows(store)) == 1


def test_a_re_sent_instance_is_recorded_after_its_fsync(node, monkeypatch):
    """A re-send replaces the file of a copy that may have been acknowledged: that file must
    not be deleted before the new one is on disk, so no row commits while the fsync is held."""
    port, store = node
    ds = make_instance("CT")
    first = Sender(port, ds)
    assert first.finish() == 0x0000
    (before,) = rows(store)
    gate = SpoolFsyncGate(store.data_dir / "spool")
    monkeypatch.setattr(os, "fsync", gate)
    ds.InstanceNumber = 2  # corrected bytes, same SOP Instance UID
    second = Sender(port, ds)
    try:
        assert gate.waiting.wait(30)
        assert not second.answered.wait(0.5)
        assert rows(store) == [before], "the row changed before the new file was on disk"
        assert store.absolute(before["spool_path"]).exists()
    finally:
        gate.open()
    assert second.finish() == 0x0000
    (after,) = rows(store)
    assert after["spool_path"] != before["spool_path"]
    assert not store.absolute(before["spool_path"]).exists()


def _receipt(ds, digest: str) -> Receipt:
    return Receipt(
        ds.SOPInstanceUID,
        ds.SOPClassUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
        str(ds.file_meta.TransferSyntaxUID),
        "PYSCU",
        "127.0.0.1",
        digest,
    )


def _overlapped(store: Store, path: Path, confirm: bool) -> Path:
    """As the SCP records a receipt: the marker, the file moved, the row committed; `confirm`:
    the fsync returned (and the marker may go). Returns the file's place in the spool."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    digest = file_sha256(path)
    received = store.tmp_write(path.read_bytes())
    with store.overlapped_receipt(received, ds.SeriesInstanceUID, ds.SOPInstanceUID) as spooled:
        assert spooled is not None
        store.record_instance(_receipt(ds, digest), spooled, spooled.stat().st_size)
    if confirm:
        store.flush_spool_file(spooled).result()
        store.receipt_confirmed(spooled)
    return spooled


def test_restart_drops_rows_whose_file_a_crash_left_missing_or_cut_short(tmp_path):
    files = write_series(
        [make_instance("CT", series_uid=s) for s in ("1.2.826.0.1.1", "1.2.826.0.1.2")]
        + [make_instance("CT", series_uid="1.2.826.0.1.3") for _ in range(2)],
        tmp_path / "in",
    )
    store = Store(tmp_path / "data")
    missing = _overlapped(store, files[0], confirm=False)
    cut = _overlapped(store, files[1], confirm=False)
    whole = _overlapped(store, files[2], confirm=False)  # crash after its fsync, before Success
    confirmed = _overlapped(store, files[3], confirm=True)
    kept_bytes = cut.read_bytes()
    store.close()
    # What a power loss can leave of files whose fsync had not returned: the rename lost, or
    # the name there with part of the bytes.
    missing.unlink()
    with cut.open("r+b") as handle:
        handle.truncate(len(kept_bytes) // 2)

    store = Store(tmp_path / "data", exclusive=True)
    try:
        recovered = store.recover_after_restart()
        left = {r["spool_path"] for r in rows(store)}
        assert left == {store.relative(whole), store.relative(confirmed)}
        # The batches that held only a dropped row went with it; the third series keeps its own.
        series = {r["series_uid"] for r in rows(store, "SELECT series_uid FROM batches")}
        assert series == {"1.2.826.0.1.3"}
        assert store.query("SELECT COUNT(*) AS n FROM receipts_in_flight")[0]["n"] == 0
        # The cut file is kept aside (never deleted), not left in the spool.
        assert recovered["orphan_spool_files_moved"] == 1
        assert not cut.exists()
        orphan = tmp_path / "data" / "quarantine" / "orphans" / cut.name
        assert orphan.read_bytes() == kept_bytes[: len(kept_bytes) // 2]
        assert whole.exists() and confirmed.exists()
    finally:
        store.close()


def test_a_file_moved_in_whose_row_never_committed_leaves_only_an_orphan(tmp_path):
    (path,) = write_series([make_instance("CT")], tmp_path / "in")
    store = Store(tmp_path / "data")
    received = store.tmp_write(path.read_bytes())
    with pytest.raises(RuntimeError), store.overlapped_receipt(received, "1.2.3", "1.2.3.4") as p:
        assert p is not None
        raise RuntimeError("crash before the row's commit")
    # The marker commits with the row: none without it.
    assert store.query("SELECT COUNT(*) AS n FROM receipts_in_flight")[0]["n"] == 0
    store.close()
    store = Store(tmp_path / "data", exclusive=True)
    try:
        recovered = store.recover_after_restart()
        assert recovered["orphan_spool_files_moved"] == 1
        assert rows(store) == []
        assert store.query("SELECT COUNT(*) AS n FROM receipts_in_flight")[0]["n"] == 0
    finally:
        store.close()


def test_the_marker_and_the_row_commit_together(tmp_path):
    """A row whose commit fails leaves no marker (nor a marker a row: one transaction), and
    the confirmed receipts' markers go in the next receipt's commit."""
    first, second = write_series([make_instance("CT"), make_instance("CT")], tmp_path / "in")
    store = Store(tmp_path / "data")
    try:
        confirmed = _overlapped(store, first, confirm=True)
        markers = "SELECT spool_path FROM receipts_in_flight"
        assert [r["spool_path"] for r in store.query(markers)] == [store.relative(confirmed)]
        # A real SQLite failure at the row's insert (as a full disk would raise).
        with store.transaction() as conn:
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON instances"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        with pytest.raises(sqlite3.IntegrityError):
            _overlapped(store, second, confirm=False)
        assert len(rows(store)) == 1
        assert [r["spool_path"] for r in store.query(markers)] == [store.relative(confirmed)]
        with store.transaction() as conn:
            conn.execute("DROP TRIGGER refuse")
        spooled = _overlapped(store, second, confirm=False)
        assert [r["spool_path"] for r in store.query(markers)] == [store.relative(spooled)]
    finally:
        store.close()


def test_an_overlapped_receipt_records_one_row(tmp_path):
    """A marker names one file: fanning the receipt out to hard links (other rows, no marker)
    inside the block is refused, and nothing is recorded."""
    (path,) = write_series([make_instance("CT")], tmp_path / "in")
    ds = dcmread(path, stop_before_pixels=True)
    store = Store(tmp_path / "data")
    try:
        received = store.tmp_write(path.read_bytes())
        with store.overlapped_receipt(received, ds.SeriesInstanceUID, ds.SOPInstanceUID) as p:
            assert p is not None
            with pytest.raises(ValueError, match="one row"):
                store.record_instance(
                    _receipt(ds, file_sha256(p)), p, p.stat().st_size, projects=["a", "b"]
                )
        assert rows(store) == []
        assert store.query("SELECT COUNT(*) AS n FROM receipts_in_flight")[0]["n"] == 0
    finally:
        store.close()
