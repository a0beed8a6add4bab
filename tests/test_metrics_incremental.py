"""/metrics' processing-time and OCR histograms add up only the series rounds processed since
the last scrape (the append-only `processed` table, written with each round's summary), and
expose what a full recomputation from every summary gives: across scrapes, a restart, a
database migrated with summaries written before the table existed, and replicas sharing
PostgreSQL. Real SQLite and a real PostgreSQL (tests/pgcluster.py)."""

from __future__ import annotations

import json
import threading
import time

from prometheus_client import CollectorRegistry

from deid_node.console.metrics import (
    DURATION_BUCKETS,
    DatabaseCollector,
    NodeView,
    make_registry,
)
from deid_node.pipeline import OCR_SECONDS_BUCKETS
from deid_node.store import Receipt, Store
from deid_node.store import metrics_queries as mq
from deid_node.store.schema import record_processed

OCR_NAME = "deid_node_ocr_seconds"
DURATION_NAME = "deid_node_series_processing_seconds"


def summary(index: int) -> dict:
    """A round's summary as pipeline.run_series writes it; every 4th without OCR, one OCR
    histogram written with other bounds than today's (counted at its nearest lower bound)."""
    durations = (0.05, 0.2, 0.37, 0.9, 2.2, 4.1, 7.3, 12.5, 45.0, 100.0, 400.0)
    out = {"files": 3, "outcome": "passed", "duration_s": durations[index % len(durations)]}
    if index % 4 != 3:
        buckets = {str(b): min(3, index % 5 + int(b)) for b in OCR_SECONDS_BUCKETS}
        if index == 5:
            buckets = {"0.2": 1, "3.0": 2, "1000.0": 3}
        out["ocr_seconds"] = {"count": 3, "sum": round(0.137 * index + 0.01, 4), "buckets": buckets}
    return out


def process(store: Store, series: str, summary_: dict, sop: str = "1", error: str = "") -> int:
    """One round of `series` received, completed, claimed and finished with `summary_` (its
    file quarantined for `error` when given)."""
    receipt = Receipt(f"{series}.{sop}", "1.2.840.10008.5.1.4.1.1.2", series, "1.2",
                      "1.2.840.10008.1.2.1", "CT1", "127.0.0.1", "h")  # fmt: skip
    stored = store.record_instance(receipt, store.spool_adopt(store.tmp_write(b"x")), 1)
    assert store.complete_stable_batches(0) == [stored.batch_id]
    assert store.claim_batch() == stored.batch_id
    result = {"instance_id": stored.id, "state": "quarantined" if error else "processed",
              "report": {"url": "u"}, "deid_path": None, "sop_uid_deid": None,
              "error": error or None}  # fmt: skip
    store.finish_processing(
        stored.batch_id, [result], passed=True, destinations=[], summary=summary_
    )
    return stored.batch_id


def expected(store: Store) -> dict:
    """What /metrics exposed before the `processed` table: every summary parsed, every time
    (the former metrics_queries.processing_durations and ocr_histogram)."""
    rows = store.query(
        "SELECT summary FROM batches WHERE summary IS NOT NULL AND summary LIKE '%duration_s%'"
    )
    values = []
    ocr_count, ocr_sum, ocr_buckets = 0, 0.0, [0] * len(OCR_SECONDS_BUCKETS)
    for row in rows:
        parsed = json.loads(row["summary"])
        if isinstance(parsed.get("duration_s"), int | float):
            values.append(float(parsed["duration_s"]))
        ocr = parsed.get("ocr_seconds")
        if not isinstance(ocr, dict):
            continue
        written = sorted((float(b), int(n)) for b, n in ocr["buckets"].items())
        ocr_count, ocr_sum = ocr_count + int(ocr["count"]), ocr_sum + float(ocr["sum"])
        for index, bound in enumerate(OCR_SECONDS_BUCKETS):
            ocr_buckets[index] += max((n for b, n in written if b <= bound), default=0)
    out = {(DURATION_NAME, "+Inf"): len(values), (DURATION_NAME, "sum"): sum(values)}
    for bound in DURATION_BUCKETS:
        out[(DURATION_NAME, str(bound))] = sum(1 for v in values if v <= bound)
    out[(OCR_NAME, "+Inf")], out[(OCR_NAME, "sum")] = ocr_count, ocr_sum
    for bound, n in zip(OCR_SECONDS_BUCKETS, ocr_buckets, strict=True):
        out[(OCR_NAME, str(bound))] = n
    return out


def exposed(registry) -> dict:
    """The two histograms of one scrape, keyed as expected() keys them."""
    out = {}
    for family in registry.collect():
        if family.name not in (DURATION_NAME, OCR_NAME):
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out[(family.name, sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                out[(family.name, "sum")] = sample.value
    assert len(out) == 2 * (len(DURATION_BUCKETS) + 2)
    return out


def view(store: Store) -> NodeView:
    return NodeView(store, lambda: True, lambda: {})


def test_histograms_over_several_scrapes_equal_a_full_recomputation(tmp_path, make_store):
    store = make_store(tmp_path / "data")
    registry = make_registry(view(store))
    assert exposed(registry) == expected(store)  # nothing processed yet: all zero
    index = 0
    for count in (3, 1, 0, 7):  # rounds processed between scrapes (none before the third)
        for _ in range(count):
            process(store, f"1.2.{index}", summary(index))
            index += 1
        assert exposed(registry) == expected(store)
    # A series processed again in a later round (a late file) counts again; a round whose
    # processing failed has no processing time.
    process(store, "1.2.0", summary(20), sop="2")
    failed = process(store, "1.2.99", {"outcome": "failed", "files": 1}, error="pixels: x")
    assert store.batch(failed)["state"] == "failed"
    values = exposed(registry)
    assert values == expected(store)
    assert values[(DURATION_NAME, "+Inf")] == 12 and values[(OCR_NAME, "+Inf")] == 3 * 10
    # The other families of the same scrape, on both engines.
    assert registry.get_sample_value("deid_node_files_quarantined_total", {"reason": "pixels"}) == 1


def test_a_restarted_process_exposes_the_same_totals_and_goes_on_counting(
    tmp_path, make_store, monkeypatch
):
    monkeypatch.setattr(mq, "PROCESSED_CHUNK", 4)  # a first scrape reads rows in chunks
    store = make_store(tmp_path / "data")
    for index in range(6):
        process(store, f"1.2.{index}", summary(index))
    before = exposed(make_registry(view(store)))
    store.close()

    again = make_store(tmp_path / "data")  # a new process on the same database
    registry = make_registry(view(again))
    assert exposed(registry) == before == expected(again)
    process(again, "1.2.6", summary(6))
    values = exposed(registry)
    assert values == expected(again) and values[(DURATION_NAME, "+Inf")] == 7


def test_summaries_written_before_the_migration_are_exposed(tmp_path, make_store):
    """A database of the previous version: summaries, no `processed` table (nor rows)."""
    store = make_store(tmp_path / "data")
    for index in range(5):
        process(store, f"1.2.{index}", summary(index))
    with store.transaction() as conn:
        conn.execute("DROP TABLE processed")
        if make_store.backend == "sqlite":
            conn.execute("PRAGMA user_version = 11")
        else:
            conn.execute("UPDATE schema_version SET version = 11")
    reference = expected(store)
    store.close()

    store = make_store(tmp_path / "data")  # migrates
    assert store.query("SELECT COUNT(*) AS n FROM processed")[0]["n"] == 5
    if make_store.backend == "postgresql":
        # The backfill commits apart from the schema's statements, whose table locks (ALTER
        # TABLE: ACCESS EXCLUSIVE) would otherwise hold every other replica's receipts for as
        # long as it reads the summaries of a long history.
        import psycopg

        with psycopg.connect(make_store.url) as pg:
            table = pg.execute("SELECT xmin::text FROM pg_class WHERE relname = 'processed'")
            (created,) = table.fetchone()  # the transaction that created the table
            rows = {x for (x,) in pg.execute("SELECT DISTINCT xmin::text FROM processed")}
            assert rows and created not in rows
    values = exposed(make_registry(view(store)))
    assert values == reference and values[(DURATION_NAME, "+Inf")] == 5
    process(store, "1.2.5", summary(5))  # and the node goes on writing rows
    assert exposed(make_registry(view(store))) == expected(store)


def test_a_scrape_reads_only_the_rounds_processed_since_the_last_one(tmp_path):
    """Every SQLite statement of a scrape, as run (parameters bound): none reads a summary,
    and the processed rounds are read after the last one counted."""
    store = Store(tmp_path / "data")
    for index in range(4):
        process(store, f"1.2.{index}", summary(index))
    registry = make_registry(view(store))
    statements: list[str] = []
    store.engine._conn.set_trace_callback(statements.append)
    first = exposed(registry)
    assert any("FROM processed WHERE id > 0 " in s for s in statements)
    statements.clear()
    assert exposed(registry) == first
    store.engine._conn.set_trace_callback(None)
    last = store.query("SELECT MAX(id) AS n FROM processed")[0]["n"]
    assert [s for s in statements if "FROM processed" in s] == [
        f"SELECT id, duration_s, ocr_seconds FROM processed WHERE id > {last} ORDER BY id"
        " LIMIT 10000"
    ]
    assert not [s for s in statements if "summary" in s], "a scrape read series summaries"
    store.close()


def test_replicas_never_make_a_scrape_pass_a_round_still_being_recorded(tmp_path, postgres_url):
    """Replica b records a round (its `processed` row taken, uncommitted) while replica a
    finishes another: a's row must not become visible first, or a scrape in between would
    count past b's row for good."""
    a, b, console = (
        Store(tmp_path / "shared", database_url=postgres_url, replica_id=name, exclusive=True)
        for name in ("a", "b", "c")
    )
    try:
        registry = make_registry(view(console))
        recorded, release = threading.Event(), threading.Event()

        def b_records() -> None:
            with b.transaction() as conn:  # as finish_processing does, paused before commit
                b.engine.lock_key(conn, "processed")
                record_processed(conn, 0, summary(1))
                recorded.set()
                assert release.wait(30)

        slow = threading.Thread(target=b_records)
        slow.start()
        assert recorded.wait(30)
        finished = threading.Thread(target=process, args=(a, "1.2.7", summary(0)))
        finished.start()
        deadline = time.monotonic() + 30
        while finished.is_alive() and not console.query(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ):
            assert time.monotonic() < deadline, "a neither finished nor waited"
            time.sleep(0.05)
        exposed(registry)  # the scrape in between
        release.set()
        slow.join(30)
        finished.join(30)
        assert not slow.is_alive() and not finished.is_alive()
        values = exposed(registry)
        assert values[(DURATION_NAME, "+Inf")] == 2, "a scrape passed a round being recorded"
        assert values[(OCR_NAME, "+Inf")] == 6
    finally:
        release.set()
        for store in (a, b, console):
            store.close()


# -- received and refused counters (instances, refused): settled under a watermark ----------

RECEIVED = "deid_node_instances_received"
BYTES = "deid_node_received_bytes"
REFUSED = "deid_node_instances_refused"
CT = "1.2.840.10008.5.1.4.1.1.2"


def receive(store: Store, series: str, sop: str, ae: str = "CT1", size: int = 1, **kw):
    """One instance received (its row committed) from `ae`, `size` bytes."""
    receipt = Receipt(f"{series}.{sop}", CT, series, "1.2", "1.2.840.10008.1.2.1", ae,
                      "127.0.0.1", f"h{size}")  # fmt: skip
    return store.record_instance(
        receipt, store.spool_adopt(store.tmp_write(b"x" * size)), size, **kw
    )


def refuse(store: Store, sop: str, ae: str = "CT1", status: int = 0xA700) -> None:
    store.record_refused(calling_ae=ae, peer="127.0.0.1", sop_uid=sop, sop_class_uid=CT,
                         status=status, reason="out of resources")  # fmt: skip


def counters(registry) -> dict:
    """The received, bytes and refused counters of one scrape: (family, labels) -> value."""
    return {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        if family.name in (RECEIVED, BYTES, REFUSED)
        for sample in family.samples
    }


def full_count(store: Store) -> dict:
    """The same counters from a COUNT(*) GROUP BY over every row (what /metrics exposed
    before it counted incrementally)."""
    out = {}
    for row in store.query(
        "SELECT calling_ae, COUNT(*) AS n, SUM(size) AS b FROM instances GROUP BY calling_ae"
    ):
        out[(RECEIVED, (("calling_ae", row["calling_ae"]), ("status", "0x0000")))] = row["n"]
        out[(BYTES, (("calling_ae", row["calling_ae"]),))] = row["b"]
    for row in store.query(
        "SELECT calling_ae, status, COUNT(*) AS n FROM refused GROUP BY calling_ae, status"
    ):
        labels = (("calling_ae", row["calling_ae"]), ("status", f"0x{row['status']:04X}"))
        out[(REFUSED, labels)] = row["n"]
    return out


def test_received_and_refused_over_many_scrapes_equal_a_full_count(
    tmp_path, make_store, monkeypatch
):
    """With a margin of 3 ids the watermark moves at most scrapes, by 0 to 11 rows: every row
    is added once, whether it is settled in a step or still counted live."""
    monkeypatch.setattr(mq, "APPENDED_MARGIN", 3)
    store = make_store(tmp_path / "data")
    collector = DatabaseCollector(view(store))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert counters(registry) == full_count(store) == {}
    index, aes = 0, ("CT1", "MR2", "US3")
    for step, count in enumerate((1, 0, 2, 3, 4, 7, 11, 1, 0, 5, 3, 3)):
        for _ in range(count):
            receive(store, f"1.2.{index % 4}", str(index), aes[index % 3], size=index % 7 + 1)
            index += 1
        for n in range((count + step) % 4):
            refuse(store, f"9.{step}.{n}", aes[(step + n) % 3], (0xA700, 0xC000)[n % 2])
        assert counters(registry) == full_count(store), f"after step {step}"
    heads = mq.appended_heads(store)
    assert collector._appended["instances"].watermark == heads["instances"] - 3 == 37
    assert collector._appended["refused"].watermark == heads["refused"] - 3 == 7
    values = counters(registry)
    assert (
        values == full_count(store)
        and sum(v for (name, _), v in values.items() if name == RECEIVED) == 40
    )
    # A new process (a fresh collector) reads it all once and exposes the same.
    assert counters(make_registry(view(store))) == values


def test_a_scrape_reads_the_rows_above_the_watermark_and_settles_the_rest_once(
    tmp_path, monkeypatch
):
    """Every SQLite statement of a scrape, as run: the rows up to the head less the margin
    are read once (settled), those above it at every scrape, through the id (rowid) range."""
    monkeypatch.setattr(mq, "APPENDED_MARGIN", 3)
    store = Store(tmp_path / "data")
    for index in range(10):
        receive(store, "1.2.1", str(index))
    registry = make_registry(view(store))
    statements: list[str] = []
    store.engine._conn.set_trace_callback(statements.append)
    first = counters(registry)
    reads = [s for s in statements if "FROM instances WHERE id >" in s]
    assert [s.split(" WHERE ")[1] for s in reads] == [
        "id > 0 AND id <= 7 GROUP BY calling_ae",
        "id > 7 GROUP BY calling_ae",
    ]
    statements.clear()
    assert counters(registry) == first  # nothing new: the live rows only, nothing settled
    reads = [s for s in statements if "FROM instances WHERE id >" in s]
    assert [s.split(" WHERE ")[1] for s in reads] == ["id > 7 GROUP BY calling_ae"]
    plan = store.query(
        "EXPLAIN QUERY PLAN SELECT calling_ae, COUNT(*) AS n FROM instances WHERE id > 7"
        " GROUP BY calling_ae"
    )
    assert any("INTEGER PRIMARY KEY (rowid>?)" in row["detail"] for row in plan), plan
    store.engine._conn.set_trace_callback(None)
    store.close()


def test_a_counter_never_goes_down_when_a_live_row_changes(tmp_path):
    """A modality re-sends an instance while its series still receives: its row is replaced
    (another calling AE, fewer bytes). Recounted live, CT1 would go down: a Prometheus
    counter that goes down reads as a restart. It stays, then goes on once passed."""
    store = Store(tmp_path / "data")
    registry = make_registry(view(store))
    receive(store, "1.2.1", "1", "CT1", size=100)
    ct1 = (("calling_ae", "CT1"), ("status", "0x0000"))
    assert counters(registry) == {(RECEIVED, ct1): 1, (BYTES, (("calling_ae", "CT1"),)): 100}
    receive(store, "1.2.1", "1", "CT2", size=40)  # same SOP instance, same open batch
    assert (RECEIVED, ct1) not in full_count(store)  # the row is CT2's now
    values = counters(registry)
    assert values[(RECEIVED, ct1)] == 1 and values[(BYTES, (("calling_ae", "CT1"),))] == 100
    assert values[(BYTES, (("calling_ae", "CT2"),))] == 40
    receive(store, "1.2.1", "2", "CT1", size=30)
    receive(store, "1.2.1", "3", "CT1", size=30)
    values = counters(registry)
    assert values[(RECEIVED, ct1)] == 2 and values[(BYTES, (("calling_ae", "CT1"),))] == 100
    receive(store, "1.2.1", "4", "CT1", size=50)
    values = counters(registry)
    assert values[(RECEIVED, ct1)] == 3 and values[(BYTES, (("calling_ae", "CT1"),))] == 110
    store.close()


def test_replicas_committing_out_of_id_order_are_all_counted(tmp_path, postgres_url):
    """Replica b's receipt has its instances row (an id taken) and waits before its commit
    (here on a lock of the holds table its transaction writes next); replica c's refused row
    is uncommitted. Replica a commits a receipt and a refusal with higher ids, a scrape
    runs, then b and c commit: the next scrape counts all four rows."""
    import psycopg

    a, b, c, console = (
        Store(tmp_path / "shared", database_url=postgres_url, replica_id=name, exclusive=True)
        for name in ("a", "b", "c", "console")
    )
    blocker = psycopg.connect(postgres_url, autocommit=False)
    release = threading.Event()
    try:
        registry = make_registry(view(console))
        blocker.execute("LOCK TABLE holds IN SHARE MODE")  # b's INSERT INTO holds waits
        slow = threading.Thread(target=receive, args=(b, "1.2.2", "1", "CT2", 20),
                                kwargs={"association": ("b", 1)})  # fmt: skip
        slow.start()
        deadline = time.monotonic() + 30
        while not console.query(
            "SELECT 1 FROM pg_locks l JOIN pg_class t ON t.oid = l.relation"
            " WHERE t.relname = 'holds' AND NOT l.granted"
        ):
            assert time.monotonic() < deadline and slow.is_alive(), "b never waited"
            time.sleep(0.05)
        held = threading.Event()

        def c_refuses() -> None:
            with c.transaction() as conn:  # as record_refused does, paused before commit
                conn.execute(
                    "INSERT INTO refused (received_at, calling_ae, peer, sop_uid, sop_class_uid,"
                    " status, reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ("2026-11-27T00:00:00", "CT2", "127.0.0.1", "9.1", CT, 0xA700, "x"),
                )
                held.set()
                assert release.wait(30)

        refusing = threading.Thread(target=c_refuses)
        refusing.start()
        assert held.wait(30)
        receive(a, "1.2.1", "1", "CT1", size=10)
        refuse(a, "9.2", "CT1")
        first = counters(registry)  # the scrape in between: a's rows only
        assert sum(v for (name, _), v in first.items() if name == RECEIVED) == 1
        blocker.rollback()
        release.set()
        slow.join(30)
        refusing.join(30)
        assert not slow.is_alive() and not refusing.is_alive()
        values = counters(registry)
        assert values == full_count(console), "a scrape passed rows still being committed"
        assert sum(v for (name, _), v in values.items() if name in (RECEIVED, REFUSED)) == 4
    finally:
        release.set()
        blocker.close()
        for store in (a, b, c, console):
            store.close()
