"""/metrics' processing-time and OCR histograms add up only the series rounds processed since
the last scrape (the append-only `processed` table, written with each round's summary), and
expose what a full recomputation from every summary gives: across scrapes, a restart, a
database migrated with summaries written before the table existed, and replicas sharing
PostgreSQL. Real SQLite and a real PostgreSQL (tests/pgcluster.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from deid_node.console.metrics import DURATION_BUCKETS, NodeView, make_registry
from deid_node.pipeline import OCR_SECONDS_BUCKETS
from deid_node.store import Receipt, Store
from deid_node.store import metrics_queries as mq
from deid_node.store.schema import record_processed

OCR_NAME = "deid_node_ocr_seconds"
DURATION_NAME = "deid_node_series_processing_seconds"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request):
    """Store(folder, **options) on the back end of the test's parameter; closes what it made."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    made: list[Store] = []

    def make(folder: Path, **options) -> Store:
        if url:
            options = {"database_url": url, "replica_id": "r1", **options}
        made.append(Store(folder, **options))
        return made[-1]

    make.backend = request.param
    make.url = url
    yield make
    for store in made:
        store.close()


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
