"""The store on its own: restart recovery of files, and read-only opening."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from deid_node.store import Receipt, Store


def receipt(sop: str = "1.2.3.1", series: str = "1.2.3") -> Receipt:
    return Receipt(
        sop,
        "1.2.840.10008.5.1.4.1.1.2",
        series,
        "1.2",
        "1.2.840.10008.1.2.1",
        "CT1",
        "127.0.0.1",
        "h",
    )


def test_restart_completes_a_quarantine_move_and_removes_unacknowledged_files(tmp_path):
    store = Store(tmp_path)
    kept = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"DICM kept")), 9)
    spool_path = Path(store.batch_instances(kept.batch_id)[0]["spool_path"])
    target = store.quarantine_path_for(kept.id)
    with store.transaction() as conn:  # as if the node died right after finish_processing
        conn.execute(
            "UPDATE instances SET state = 'quarantined', report = ? WHERE id = ?",
            (json.dumps({"quarantine": str(target)}), kept.id),
        )
    orphan = store.spool_adopt(store.tmp_write(b"never committed"))  # died before the commit
    partial = store.tmp_write(b"half an association")  # died mid-receive
    store.close()

    store = Store(tmp_path)
    recovered = store.recover_after_restart()
    assert recovered["quarantine_moves_completed"] == 1
    assert recovered["orphan_spool_files_removed"] == 1
    assert recovered["partial_files_removed"] == 1
    assert target.read_bytes() == b"DICM kept" and not spool_path.exists()
    assert not orphan.exists() and not partial.exists()
    store.close()


def test_readonly_store_reads_and_cannot_write(tmp_path):
    store = Store(tmp_path)
    store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    store.close()
    reader = Store(tmp_path, readonly=True)
    assert reader.status()["instances"] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader._conn.execute("DELETE FROM instances")
    reader.close()


def test_deliveries_to_a_removed_destination_fail_instead_of_waiting_forever(tmp_path):
    store = Store(tmp_path)
    stored = store.record_instance(receipt(), store.spool_adopt(store.tmp_write(b"x")), 1)
    deid = tmp_path / "deid.dcm"
    deid.write_bytes(b"x")
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
    store.close()
