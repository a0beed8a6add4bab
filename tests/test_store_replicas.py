"""Replicas sharing one PostgreSQL database, at the store's level: claims under leases, work taken
over when a lease runs out, association holds of live replicas, one batch per series whoever
receives it, and the database going away and coming back. A real PostgreSQL (tests/pgcluster.py);
two Store objects with different replica ids stand for two replicas. Plus the SQL translation."""

from __future__ import annotations

import threading
import time

import pytest
from pgcluster import pg_start, pg_stop

from deid_node.store import Receipt, Store
from deid_node.store.engine import StoreUnavailableError, to_postgres
from deid_node.store.replicas import ClaimLostError


def receipt(sop: str, series: str = "1.2.3") -> Receipt:
    return Receipt(sop, "1.2.840.10008.5.1.4.1.1.2", series, "1.2", "1.2.840.10008.1.2.1", "CT1",
                   "127.0.0.1", f"sha-{sop}")  # fmt: skip


@pytest.fixture
def pair(tmp_path, postgres_url):
    """Two replicas, a and b, on one database and one shared folder."""
    stores = [
        Store(tmp_path / "shared", database_url=postgres_url, replica_id=name, exclusive=True)
        for name in ("a", "b")
    ]
    for store in stores:
        store.lease_seconds = 30
        store.register_replica(0)
    yield stores
    for store in stores:
        store.close()


def receive(store: Store, sop: str, series: str = "1.2.3", association=None) -> int:
    path = store.spool_adopt(store.tmp_write(sop.encode()))
    return store.record_instance(receipt(sop, series), path, 1, association=association).batch_id


def once_up(call, *args):
    """call(*args) once the store reaches PostgreSQL again (it reconnects by itself)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return call(*args)
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not reconnect by itself"
            time.sleep(0.3)


def expire(store: Store, table: str) -> None:
    """As if the holder's heartbeat had stopped lease_seconds ago."""
    with store.transaction() as conn:
        conn.execute(f"UPDATE {table} SET lease_until = ? WHERE claimed_by IS NOT NULL", (0,))


def test_one_replica_claims_a_batch_and_another_takes_it_over_once_the_lease_ran_out(pair):
    a, b = pair
    batch_id = receive(a, "1.2.3.1")
    assert b.complete_stable_batches(0) == [batch_id]
    assert a.complete_stable_batches(0) == [], "a series was completed twice"
    assert a.claim_batch() == batch_id
    assert b.claim_batch() is None, "two replicas claimed one batch"
    b.heartbeat()  # renews only b's own claims
    assert b.requeue_expired()["batches"] == 0, "a live claim was taken over"

    expire(a, "batches")
    assert b.requeue_expired()["batches"] == 1
    assert b.claim_batch() == batch_id and a.batch(batch_id)["claimed_by"] == "b"
    result = {"instance_id": a.batch_instances(batch_id)[0]["id"], "state": "processed",
              "report": {"url": "u"}, "deid_path": None, "sop_uid_deid": "2.25.1"}  # fmt: skip
    with pytest.raises(ClaimLostError):  # a woke up late: its results are not recorded
        a.finish_processing(batch_id, [result], passed=True, destinations=["d"], summary={})
    assert a.processing_failed(batch_id, "late", 3) == "complete"  # and changes nothing
    assert a.batch(batch_id)["state"] == "processing"
    b.finish_processing(batch_id, [result], passed=True, destinations=["d"], summary={})
    assert b.batch(batch_id)["state"] == "rejected"  # nothing written to send


def test_a_delivery_is_sent_by_one_replica_at_a_time(pair, tmp_path):
    a, b = pair
    batch_id = receive(a, "1.2.3.1")
    a.complete_stable_batches(0)
    assert a.claim_batch() == batch_id
    out = tmp_path / "shared" / "deid" / "x.dcm"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"x")
    instance_id = a.batch_instances(batch_id)[0]["id"]
    result = {"instance_id": instance_id, "state": "processed", "report": {"url": "u"},
              "deid_path": str(out), "sop_uid_deid": "2.25.1"}  # fmt: skip
    assert a.finish_processing(batch_id, [result], passed=True, destinations=["d"], summary={})
    delivery = a.claim_due_delivery("d")
    assert delivery is not None
    assert b.claim_due_delivery("d") is None, "two replicas sending one delivery"
    a.mark_sent([(instance_id, "d", "dicom://d/2.25.1", 0)])
    expire(a, "deliveries")  # a died after one acknowledgement
    assert b.requeue_expired()["deliveries"] == 1
    taken = b.claim_due_delivery("d")
    assert taken is not None and taken["id"] == delivery["id"]
    assert b.unsent_instances(batch_id, "d") == [], "an acknowledged instance would be re-sent"
    b.delivery_done(taken["id"])
    assert b.batch(batch_id)["state"] == "forwarded"


def test_an_open_association_of_a_live_replica_holds_the_series_for_all(pair):
    a, b = pair
    batch_id = receive(a, "1.2.3.1", association="assoc")
    assert b.complete_stable_batches(0) == [], "completed while a's association was open"
    with a.transaction() as conn:  # a stopped beating (died with the association open)
        conn.execute("UPDATE replicas SET heartbeat_at = 0 WHERE replica_id = 'a'")
    assert b.requeue_expired()["holds"] == 1
    assert b.complete_stable_batches(0) == [batch_id]


def test_a_hold_whose_release_failed_is_let_go_by_its_replicas_next_heartbeat(pair, pg_cluster):
    """The association closed while PostgreSQL was down: its hold stayed in the database, and
    a live replica's hold keeps the series from completing on every replica."""
    a, b = pair
    batch_id = receive(a, "1.2.3.1", association="assoc")
    pg_stop(pg_cluster, mode="immediate")
    try:
        with pytest.raises(StoreUnavailableError):
            a.association_closed("assoc")
    finally:
        pg_start(pg_cluster)
    assert once_up(b.complete_stable_batches, 0) == [], "completed before the hold was let go"
    once_up(a.heartbeat)
    assert a.query("SELECT * FROM holds") == []
    assert b.complete_stable_batches(0) == [batch_id]


def test_a_heartbeat_keeps_the_holds_of_open_associations(pair):
    a, b = pair
    batch_id = receive(a, "1.2.3.1", association="assoc")
    a.heartbeat()
    assert b.complete_stable_batches(0) == [], "an open association's hold was let go"
    a.association_closed("assoc")
    assert b.complete_stable_batches(0) == [batch_id]


def test_instances_of_one_series_received_by_two_replicas_join_one_batch(pair):
    a, b = pair
    errors: list[BaseException] = []

    def send(store: Store, prefix: str) -> None:
        try:
            for n in range(15):
                receive(store, f"1.2.3.{prefix}{n}", association=f"assoc-{prefix}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s, p)) for s, p in ((a, "1"), (b, "2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    batches = a.query("SELECT id, state FROM batches")
    assert len(batches) == 1, f"one series became {len(batches)} batches"
    assert a.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 30
    a.association_closed("assoc-1")
    assert a.complete_stable_batches(0) == [], "b's open association no longer holds it"
    b.association_closed("assoc-2")
    assert a.complete_stable_batches(0) == [batches[0]["id"]]


def test_the_database_going_away_is_reported_quickly_and_survived(pair, pg_cluster):
    a, _ = pair
    receive(a, "1.2.3.1")
    pg_stop(pg_cluster, mode="immediate")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            receive(a, "1.2.3.2")
        with pytest.raises(StoreUnavailableError):
            a.status()
        # Well inside a modality's DIMSE timeout (storescu's default is unlimited, DCMTK
        # tools are often run with 20-60 s): the SCP answers 0xA700 with it.
        assert time.monotonic() - started < 15
    finally:
        pg_start(pg_cluster)
    deadline = time.monotonic() + 30
    while True:
        try:
            receive(a, "1.2.3.3")
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not reconnect by itself"
            time.sleep(0.3)
    assert a.status()["instances"] == 2


@pytest.mark.parametrize(
    ("sqlite", "postgres"),
    [
        ("SELECT x FROM t WHERE a = ? AND b IS ?", "SELECT x FROM t WHERE a = %s AND b IS NOT DISTINCT FROM %s"),
        ("SELECT 1 FROM t WHERE a = ?1 AND b < ?2 AND c IS NULL", "SELECT 1 FROM t WHERE a = %(p1)s AND b < %(p2)s AND c IS NULL"),
        ("INSERT OR IGNORE INTO series (a) VALUES (?)", "INSERT INTO series (a) VALUES (%s) ON CONFLICT DO NOTHING"),
        ("INSERT INTO batches (a) VALUES (?)", "INSERT INTO batches (a) VALUES (%s) RETURNING id"),
        ("SELECT json_extract(i.report, '$.pixels.regions') FROM i", "SELECT (i.report::jsonb #>> '{pixels,regions}') FROM i"),
        ("WHERE json_extract(p.report, '$.save_condition') = 0", "WHERE (p.report::jsonb #> '{save_condition}') = 'false'::jsonb"),
        ("SELECT user FROM audit WHERE x LIKE 'a%'", "SELECT \"user\" FROM audit WHERE x LIKE 'a%%'"),
    ],
)  # fmt: skip
def test_the_store_sql_in_postgresql_dialect(sqlite, postgres):
    assert to_postgres(sqlite)[0] == postgres
