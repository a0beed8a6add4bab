"""The store on its own: restart recovery of files, the data folder's lock, paths relative to
the data folder (and the migration of absolute ones), open associations holding a series,
and re-queuing what failed processing. The state transitions run on both back ends: SQLite and
a real PostgreSQL (tests/pgcluster.py: a temporary cluster, a fresh database per test)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from deid_node.errors import DataDirInUseError
from deid_node.store import Receipt, Store


def receipt(sop: str = "1.2.3.1", series: str = "1.2.3", sha256: str = "h") -> Receipt:
    return Receipt(
        sop,
        "1.2.840.10008.5.1.4.1.1.2",
        series,
        "1.2",
        "1.2.840.10008.1.2.1",
        "CT1",
        "127.0.0.1",
        sha256,
    )


def receive(store: Store, data: bytes = b"x", **fields) -> int:
    """One instance received and committed; returns its batch id."""
    path = store.spool_adopt(store.tmp_write(data))
    return store.record_instance(receipt(**fields), path, len(data)).batch_id


def quarantine_row(store: Store, instance_id: int, target: Path) -> None:
    """As processing leaves an instance it could not de-identify (report names the target)."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE instances SET state = 'quarantined', report = ? WHERE id = ?",
            (json.dumps({"quarantine": store.relative(target)}), instance_id),
        )
        conn.execute(
            "UPDATE batches SET state = 'rejected', processed_at = 'x'"
            " WHERE id = (SELECT batch_id FROM instances WHERE id = ?)",
            (instance_id,),
        )


def test_restart_completes_a_quarantine_move_and_moves_orphans_aside(tmp_path, make_store):
    store = make_store(tmp_path)
    kept = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"DICM kept")), 9)
    spool_path = Path(store.batch_instances(kept.batch_id)[0]["spool_path"])
    target = store.quarantine_path_for(kept.id)
    with store.transaction() as conn:  # as if the node died right after finish_processing
        conn.execute(
            "UPDATE instances SET state = 'quarantined', report = ? WHERE id = ?",
            (json.dumps({"quarantine": store.relative(target)}), kept.id),
        )
    orphan = store.spool_adopt(store.tmp_write(b"never committed"))  # died before the commit
    partial = store.tmp_write(b"half an association")  # died mid-receive
    store.close()

    store = make_store(tmp_path, exclusive=True)
    recovered = store.recover_after_restart()
    assert recovered["quarantine_moves_completed"] == 1
    assert recovered["partial_files_removed"] == 1
    assert target.read_bytes() == b"DICM kept" and not spool_path.exists()
    assert not partial.exists()
    if make_store.backend == "sqlite":
        assert recovered["orphan_spool_files_moved"] == 1
        assert not orphan.exists()
        # Never deleted: the orphan is kept aside, byte for byte.
        orphans = tmp_path / "quarantine" / "orphans"
        assert (orphans / orphan.name).read_bytes() == b"never committed"
    else:
        # A shared folder: the file may be another replica's receipt in flight. Left alone.
        assert recovered["orphan_spool_files_moved"] == 0 and orphan.exists()


def test_paths_are_relative_and_a_moved_folder_keeps_working(tmp_path, make_store):
    store = make_store(tmp_path / "old")
    batch_id = receive(store, b"DICM moved")
    raw = store.query("SELECT spool_path FROM instances")[0]["spool_path"]
    assert not raw.startswith("/") and raw.startswith("spool/")
    store.close()

    shutil.move(tmp_path / "old", tmp_path / "new disk")
    store = make_store(tmp_path / "new disk", exclusive=True)
    recovered = store.recover_after_restart()
    assert recovered["orphan_spool_files_moved"] == 0, "a known file was taken for an orphan"
    (row,) = store.batch_instances(batch_id)
    assert Path(row["spool_path"]).read_bytes() == b"DICM moved"
    assert Path(row["spool_path"]).is_relative_to(tmp_path / "new disk")


def test_migration_makes_absolute_paths_relative_even_after_a_move(tmp_path):
    """A database written by an older version holds absolute paths into its folder of then."""
    store = Store(tmp_path / "then")
    stored = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"DICM")), 4)
    old = str(tmp_path / "then")
    with store.transaction() as conn:
        conn.execute(
            "UPDATE instances SET spool_path = ?, deid_path = ?, report = ? WHERE id = ?",
            (
                old + "/" + store.query("SELECT spool_path FROM instances")[0]["spool_path"],
                f"{old}/deid/1/1.2.9/1.2.9.1/2.25.7.dcm",
                json.dumps({"quarantine": f"{old}/quarantine/instance-1.dcm", "url": "u"}),
                stored.id,
            ),
        )
        conn.execute(
            "INSERT INTO refused (received_at, status, reason, quarantine_path)"
            " VALUES ('t', 49152, 'r', ?)",
            (f"{old}/quarantine/abc.dcm",),
        )
        conn.execute("PRAGMA user_version = 5")  # before the migration to relative paths
    store.close()
    shutil.move(tmp_path / "then", tmp_path / "now")

    store = Store(tmp_path / "now", exclusive=True)
    row = store.query("SELECT spool_path, deid_path, report FROM instances")[0]
    assert row["spool_path"].startswith("spool/") and row["spool_path"].endswith(".dcm")
    assert row["deid_path"] == "deid/1/1.2.9/1.2.9.1/2.25.7.dcm"
    assert json.loads(row["report"]) == {"quarantine": "quarantine/instance-1.dcm", "url": "u"}
    assert store.query("SELECT quarantine_path FROM refused")[0]["quarantine_path"] == (
        "quarantine/abc.dcm"
    )
    assert Path(store.batch_instances(stored.batch_id)[0]["spool_path"]).read_bytes() == b"DICM"
    assert store.recover_after_restart()["orphan_spool_files_moved"] == 0
    store.close()


def test_a_second_owner_is_refused_and_touches_nothing(tmp_path):
    owner = Store(tmp_path / "data", exclusive=True)
    receive(owner)
    orphan = owner.spool_adopt(owner.tmp_write(b"in flight: moved in, not yet committed"))
    before = sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file())
    with pytest.raises(DataDirInUseError, match="in use by another deid-node process"):
        Store(tmp_path / "data", exclusive=True)
    assert sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file()) == before
    assert orphan.exists()
    # `retry` and `status` still work next to the owner.
    client = Store(tmp_path / "data")
    assert client.status()["instances"] == 1
    client.close()
    owner.close()
    Store(tmp_path / "data", exclusive=True).close()  # released with the owner


def test_readonly_store_reads_and_cannot_write(tmp_path):
    store = Store(tmp_path)
    store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    store.close()
    reader = Store(tmp_path, readonly=True)
    assert reader.status()["instances"] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.engine._conn.execute("DELETE FROM instances")
    reader.close()


def test_an_open_association_holds_its_series_until_it_closes(tmp_path, make_store):
    store = make_store(tmp_path)
    path = store.spool_adopt(store.tmp_write(b"x"))
    batch_id = store.record_instance(receipt(), path, 1, association="assoc-1").batch_id
    other = store.spool_adopt(store.tmp_write(b"y"))
    store.record_instance(receipt(series="1.2.4"), other, 1)  # no association: not held
    assert store.complete_stable_batches(0) == [batch_id + 1]
    assert store.oldest_receiving() is None, "a held batch must not drive the scheduler"
    assert store.association_closed("assoc-1") == [batch_id]
    # stable_seconds counts from the release, not from the last instance.
    assert store.complete_stable_batches(60) == []
    assert store.complete_stable_batches(0) == [batch_id]


def test_deliveries_to_a_removed_destination_fail_instead_of_waiting_forever(tmp_path, make_store):
    store = make_store(tmp_path)
    stored = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    deid = tmp_path / "deid.dcm"
    deid.write_bytes(b"x")
    assert store.complete_stable_batches(0) == [stored.batch_id]
    assert store.claim_batch() == stored.batch_id
    result = {
        "instance_id": stored.id,
        "state": "processed",
        "report": {"url": "u"},
        "deid_path": str(deid),
        "sop_uid_deid": "2.25.1",
    }
    state = store.finish_processing(
        stored.batch_id,
        [result],
        passed=True,
        destinations=["old", "kept"],
        summary={"outcome": "passed"},
    )
    assert state == "forwarding"
    assert store.fail_orphan_deliveries(["kept"]) == 1
    rows = {r["destination"]: r for r in store.query("SELECT * FROM deliveries")}
    assert (
        rows["old"]["state"] == "failed" and "no longer in the config" in rows["old"]["last_error"]
    )
    assert rows["kept"]["state"] == "pending"


def test_acknowledgements_commit_without_fsync_and_leave_full_sync_on(tmp_path):
    store = Store(tmp_path)
    stored = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    with store.transaction() as conn:
        conn.execute("UPDATE instances SET report = '{}' WHERE id = ?", (stored.id,))
    store.mark_sent([(stored.id, "research", "dicom://R/2.25.1", 0)])
    assert store.query("SELECT COUNT(*) AS n FROM sent")[0]["n"] == 1
    # Receipts (acknowledged to a modality) stay power-safe: FULL is 2.
    assert store.engine._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    store.close()


def test_re_sent_bytes_of_a_quarantined_instance_are_a_new_attempt(tmp_path, make_store):
    store = make_store(tmp_path)
    first = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    quarantine_row(store, first.id, store.quarantine_path_for(first.id))
    again = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    assert not again.duplicate and again.round == 2
    assert store.batch_instances(again.batch_id)[0]["attempt"] == 2
    # The same bytes of an instance that was processed stay a duplicate.
    with store.transaction() as conn:
        conn.execute("UPDATE instances SET state = 'processed' WHERE id = ?", (again.id,))
        conn.execute("UPDATE batches SET state = 'forwarded' WHERE id = ?", (again.batch_id,))
    third = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    assert third.duplicate


def test_retry_requeues_failed_processing_and_quarantined_instances(tmp_path, make_store):
    store = make_store(tmp_path)
    # Series A: processing raised until it failed (the batch, not one file).
    failed_batch = receive(store, series="1.2.5")
    with store.transaction() as conn:
        conn.execute("UPDATE batches SET state = 'failed', processing_attempts = 3")
    # Series B: one file quarantined (kept), one whose move never happened (still spooled).
    kept = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"a")), 1)
    spooled = store.record_instance(
        receipt(sop="1.2.3.2"), store.spool_adopt(store.tmp_write(b"b")), 1
    )
    target = store.quarantine_path_for(kept.id)
    store.move_to_quarantine(Path(store.batch_instances(kept.batch_id)[0]["spool_path"]), target)
    quarantine_row(store, kept.id, target)
    quarantine_row(store, spooled.id, store.quarantine_path_for(spooled.id))

    assert store.retry_processing("1.2.5") == {"batches": 1, "instances": 0}
    assert store.batch(failed_batch)["state"] == "complete"
    assert store.batch(failed_batch)["processing_attempts"] == 0
    assert store.retry_processing("1.2.3") == {"batches": 0, "instances": 2}
    new = store.query("SELECT * FROM batches WHERE series_uid = '1.2.3' AND round = 2")[0]
    assert new["state"] == "complete"
    rows = store.batch_instances(new["id"])
    assert [Path(r["spool_path"]).read_bytes() for r in rows] == [b"a", b"b"]
    assert [r["attempt"] for r in rows] == [2, 2]
    # Only the latest attempt is re-queued, once per retry.
    assert store.retry_processing("1.2.3") == {"batches": 0, "instances": 0}
