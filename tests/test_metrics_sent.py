"""/metrics' forwarded counter (deid_node_instances_forwarded, the `sent` table) is settled
under a watermark like the received and refused ones: a scrape reads the rows past it (SQLite:
by rowid; PostgreSQL: by `sent.seq`, migration 13), never the whole table, and exposes what a
COUNT(*) over every row gives: across scrapes, re-acknowledgements (the only rewrite of a
`sent` row: an upsert), a restart, and a PostgreSQL database upgraded from version 12 with
rows. Real SQLite and a real PostgreSQL (tests/pgcluster.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from deid_node.console.metrics import DatabaseCollector, NodeView, make_registry
from deid_node.store import Receipt, Store
from deid_node.store import metrics_queries as mq

FORWARDED = "deid_node_instances_forwarded"
DESTINATIONS = ("pacs", "folder", "web")


def view(store: Store) -> NodeView:
    return NodeView(store, lambda: True, lambda: {})


def received(store: Store, count: int, first: int = 0) -> list[int]:
    """`count` instances received (their rows committed, a report written): their ids."""
    ids = []
    for index in range(first, first + count):
        receipt = Receipt(f"1.2.{index}", "1.2.840.10008.5.1.4.1.1.2", "1.2.9", "1.2",
                          "1.2.840.10008.1.2.1", "CT1", "127.0.0.1", f"h{index}")  # fmt: skip
        ids.append(store.record_instance(receipt, store.spool_adopt(store.tmp_write(b"x")), 1).id)
    with store.transaction() as conn:
        conn.execute("UPDATE instances SET report = '{}' WHERE report IS NULL")
    return ids


def acknowledge(store: Store, pairs: list[tuple[int, str]]) -> None:
    """What the forwarding loop records, one acknowledgement at a time."""
    for instance_id, destination in pairs:
        store.mark_sent([(instance_id, destination, f"u{instance_id}", 0)])


def forwarded(registry) -> dict[str, float]:
    return {
        sample.labels["destination"]: sample.value
        for family in registry.collect()
        if family.name == FORWARDED
        for sample in family.samples
    }


def full_count(store: Store) -> dict[str, float]:
    """What /metrics exposed before: a COUNT(*) over every `sent` row."""
    rows = store.query("SELECT destination, COUNT(*) AS n FROM sent GROUP BY destination")
    return {row["destination"]: row["n"] for row in rows}


def collector_registry(store: Store) -> tuple[DatabaseCollector, CollectorRegistry]:
    collector = DatabaseCollector(view(store))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return collector, registry


def test_forwarded_over_many_scrapes_equals_a_full_count(tmp_path, make_store, monkeypatch):
    """With a margin of 3 the watermark moves at most scrapes; acknowledgements recorded
    again (a re-send after a takeover: the row's upsert) below and above it count once."""
    monkeypatch.setattr(mq, "APPENDED_MARGIN", 3)
    store = make_store(tmp_path / "data")
    ids = received(store, 30)
    collector, registry = collector_registry(store)
    assert forwarded(registry) == full_count(store) == {}
    pairs = [(i, DESTINATIONS[n % 3]) for n, i in enumerate(ids)] + [(i, "web") for i in ids[:9]]
    done = 0
    for step, count in enumerate((1, 0, 2, 5, 1, 7, 0, 11, 3, 9)):
        acknowledge(store, pairs[done : done + count])
        done += count
        if step in (3, 6, 9):  # re-acknowledged: the first (settled by now) and the last
            acknowledge(store, [pairs[0], pairs[done - 1]])
        assert forwarded(registry) == full_count(store), f"after step {step}"
    assert done == 39  # 3 of the "web" pairs were acknowledged before: 36 rows
    heads = mq.appended_heads(store)
    assert collector._appended["sent"].watermark == heads["sent"] - 3 > 0
    values = forwarded(registry)
    assert values == full_count(store) == {"pacs": 10, "folder": 10, "web": 16}
    assert forwarded(make_registry(view(store))) == values  # a new collector reads it all once
    store.close()

    again = make_store(tmp_path / "data")  # a restarted process on the same database
    registry = make_registry(view(again))
    assert forwarded(registry) == values
    acknowledge(again, [(ids[20], "pacs"), (ids[0], "pacs")])  # one new, one again
    assert forwarded(registry) == full_count(again) == {**values, "pacs": 11}


def test_a_scrape_reads_the_sent_rows_past_the_watermark_only(tmp_path, monkeypatch):
    """Every SQLite statement of a scrape, as run: `sent` is read by rowid range (the rows up
    to the head less the margin once, those above it at each scrape), never as a whole (the
    COUNT(*) GROUP BY over the table that every scrape ran before)."""
    monkeypatch.setattr(mq, "APPENDED_MARGIN", 3)
    store = Store(tmp_path / "data")
    acknowledge(store, [(i, "pacs") for i in received(store, 10)])
    registry = make_registry(view(store))
    statements: list[str] = []
    store.engine._conn.set_trace_callback(statements.append)
    assert forwarded(registry) == {"pacs": 10}
    reads = [s for s in statements if "FROM sent" in s and "MAX(rowid)" not in s]
    assert [s.split(" FROM sent")[1] for s in reads] == [
        " WHERE rowid > 0 AND rowid <= 7 GROUP BY destination",
        " WHERE rowid > 7 GROUP BY destination",
    ]
    statements.clear()
    assert forwarded(registry) == {"pacs": 10}
    reads = [s for s in statements if "FROM sent" in s and "MAX(rowid)" not in s]
    assert [s.split(" FROM sent")[1] for s in reads] == [" WHERE rowid > 7 GROUP BY destination"]
    store.engine._conn.set_trace_callback(None)
    plan = store.query(
        "EXPLAIN QUERY PLAN SELECT destination, COUNT(*) AS n FROM sent WHERE rowid > 7"
        " GROUP BY destination"
    )
    assert any("rowid>?" in row["detail"] for row in plan), plan
    store.close()


def test_postgres_upgrade_from_version_12_with_rows_counts_every_row(
    tmp_path, postgres_url, monkeypatch
):
    """A database of the previous version (no `sent.seq`) with acknowledgements: migration 13
    adds the column without rewriting those rows (they keep seq NULL and their row version),
    numbers every later insert (a replica still on version 12 inserts without naming it),
    and /metrics counts old and new rows exactly, across scrapes and a restart."""
    import psycopg

    monkeypatch.setattr(mq, "APPENDED_MARGIN", 3)
    store = Store(tmp_path / "shared", database_url=postgres_url, replica_id="a", exclusive=True)
    ids = received(store, 20)
    acknowledge(store, [(i, DESTINATIONS[n % 3]) for n, i in enumerate(ids[:8])])
    with store.transaction() as conn:
        conn.execute("ALTER TABLE sent DROP COLUMN seq")  # its sequence and index go with it
        conn.execute("UPDATE schema_version SET version = 12")
    store.close()
    with psycopg.connect(postgres_url) as pg:
        before = pg.execute("SELECT instance_id, destination, xmin::text FROM sent").fetchall()

    store = Store(tmp_path / "shared", database_url=postgres_url, replica_id="a", exclusive=True)
    try:
        assert store.engine.schema_version() == 13
        with psycopg.connect(postgres_url) as pg:
            after = pg.execute(
                "SELECT instance_id, destination, xmin::text FROM sent WHERE seq IS NULL"
            ).fetchall()
            assert sorted(after) == sorted(before), "migration 13 rewrote the rows it found"
            with pg.transaction():  # a replica on version 12 acknowledges
                pg.execute(
                    "INSERT INTO sent (instance_id, destination, url_deid, status, at)"
                    " VALUES (%s, 'pacs', 'u', 0, 'x')",
                    (ids[8],),
                )
        assert store.query("SELECT seq FROM sent WHERE instance_id = ?", (ids[8],))[0]["seq"]
        collector, registry = collector_registry(store)
        assert forwarded(registry) == full_count(store) == {"pacs": 4, "folder": 3, "web": 2}
        for step in range(3):
            acknowledge(store, [(i, "folder") for i in ids[9 + 3 * step : 12 + 3 * step]])
            acknowledge(store, [(ids[0], "pacs"), (ids[9], "folder")])  # again: no new row
            assert forwarded(registry) == full_count(store), f"after step {step}"
        assert collector._appended["sent"].watermark > 0
        assert forwarded(registry) == {"pacs": 4, "folder": 12, "web": 2}
        assert forwarded(make_registry(view(store))) == full_count(store)  # a restart
    finally:
        store.close()
