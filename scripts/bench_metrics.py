#!/usr/bin/env python3
"""What a /metrics scrape and the console's list pages cost on a large database.

Fills a fresh store with N instances (100 per series round, 1 in 50 quarantined, each sent to
one destination), then times the console's Prometheus collector (first scrape: every row;
later ones: received and refused read only the rows added since) and the first page of
/quarantine and /series.

With --rounds N instead: N processed series rounds (one instance each), every one with a
summary as the pipeline writes it (processing time, OCR seconds histogram), and the scrape
timed first (a new process: reads every round once), then with nothing new, then after 100
more rounds; plus the first scrape's peak of Python memory. Summaries are written as an older
version did and the `processed` rows made by the migration's backfill (what an upgraded node
does; the node itself writes each row with the summary); run against an older checkout
(PYTHONPATH) it times that version's scrape.

Run: `.venv/bin/python scripts/bench_metrics.py [--instances 200000 | --rounds 100000]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from deid_node.console.metrics import DatabaseCollector, NodeView
from deid_node.store import Store
from deid_node.store import metrics_queries as mq

try:
    from deid_node.store.schema import backfill_processed, record_processed
except ImportError:  # a version before the `processed` table (migration 12)
    backfill_processed = record_processed = None


def fill(store: Store, count: int) -> None:
    rounds = max(1, count // 100)
    with store.transaction() as conn:
        conn.execute("INSERT INTO series (series_uid) VALUES ('1.2')")
        conn.executemany(
            "INSERT INTO batches (id, series_uid, round, state, calling_ae, summary)"
            " VALUES (?, '1.2', ?, ?, 'AE', '{\"duration_s\": 0.5}')",
            [(i, i, ("forwarded", "rejected", "failed")[i % 3]) for i in range(1, rounds + 1)],
        )
        conn.executemany(
            "INSERT INTO instances (batch_id, series_uid, sop_uid, calling_ae, size,"
            " received_at, state, error) VALUES (?, '1.2', ?, ?, 1000, '2026-01-01T10:00:00', ?, ?)",
            [
                (
                    1 + i // 100,
                    f"1.{i}",
                    f"AE{i % 5}",
                    "quarantined" if i % 50 == 0 else "processed",
                    "encapsulated document" if i % 50 == 0 else None,
                )
                for i in range(count)
            ],
        )
        conn.executemany(
            "INSERT INTO deliveries (batch_id, destination, state, attempts)"
            " VALUES (?, 'out', 'done', 1)",
            [(i,) for i in range(1, rounds + 1)],
        )
        conn.executemany(
            "INSERT INTO sent (instance_id, destination, status) VALUES (?, 'out', 0)",
            [(i,) for i in range(1, count + 1)],
        )


def round_summary(index: int) -> str:
    bounds = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
    return json.dumps(
        {
            "files": 100,
            "passed_conditions": 100,
            "written": 100,
            "quarantined": 0,
            "outcome": "passed",
            "duration_s": round(0.5 + (index % 997) / 100, 3),
            "ocr_seconds": {
                "count": 100,
                "sum": round(30 + index % 13, 4),
                "buckets": {str(b): min(100, int(b * 40)) for b in bounds},
            },
        }
    )


def fill_rounds(store: Store, rounds: int, first: int = 1) -> None:
    """Processed rounds `first`.. `first + rounds - 1`, as an older version wrote them."""
    with store.transaction() as conn:
        if first == 1:
            conn.execute("INSERT INTO series (series_uid) VALUES ('1.2')")
        ids = range(first, first + rounds)
        conn.executemany(
            "INSERT INTO batches (id, series_uid, round, state, calling_ae, summary)"
            " VALUES (?, '1.2', ?, 'forwarded', 'AE', ?)",
            [(i, i, round_summary(i)) for i in ids],
        )
        conn.executemany(
            "INSERT INTO instances (id, batch_id, series_uid, sop_uid, calling_ae, size,"
            " received_at, state) VALUES (?, ?, '1.2', ?, 'AE', 1000, '2026-01-01T10:00:00',"
            " 'processed')",
            [(i, i, f"1.{i}") for i in ids],
        )
        conn.executemany(
            "INSERT INTO deliveries (batch_id, destination, state, attempts)"
            " VALUES (?, 'out', 'done', 1)",
            [(i,) for i in ids],
        )
        conn.executemany(
            "INSERT INTO sent (instance_id, destination, status) VALUES (?, 'out', 0)",
            [(i,) for i in ids],
        )
        if backfill_processed is not None and first == 1:
            backfill_processed(conn)
        elif backfill_processed is not None:  # as finish_processing writes them
            for i in ids:
                record_processed(conn, i, json.loads(round_summary(i)))


def bench_rounds(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        store = Store(Path(folder))
        fill_rounds(store, rounds)
        view = NodeView(store, lambda: True, lambda: {"out": True})
        tracemalloc.start()  # slows Python down: a collector of its own, not timed
        list(DatabaseCollector(view).collect())
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        collector = DatabaseCollector(view)
        first = timed_ms(lambda: list(collector.collect()))
        later = min(timed_ms(lambda: list(collector.collect())) for _ in range(5))
        fill_rounds(store, 100, first=rounds + 1)
        after_new = timed_ms(lambda: list(collector.collect()))
        store.close()
    print(
        f"{rounds} processed rounds: first scrape {first:.0f} ms (Python memory peak"
        f" {peak:.1f} MiB), later scrape {later:.0f} ms, scrape after 100 new rounds"
        f" {after_new:.0f} ms"
    )


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=0)
    args = parser.parse_args()
    if args.rounds:
        bench_rounds(args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        store = Store(Path(folder))
        fill(store, args.instances)
        collector = DatabaseCollector(NodeView(store, lambda: True, lambda: {"out": True}))
        first = timed_ms(lambda: list(collector.collect()))
        later = min(timed_ms(lambda: list(collector.collect())) for _ in range(3))
        quarantine = min(timed_ms(lambda: mq.quarantine_page(store, limit=50)) for _ in range(3))
        series = min(timed_ms(lambda: mq.series_page(store, limit=50)) for _ in range(3))
        store.close()
    print(
        f"{args.instances} instances: first scrape {first:.0f} ms, later scrape {later:.0f} ms,"
        f" /quarantine page {quarantine:.0f} ms, /series page {series:.0f} ms"
    )


if __name__ == "__main__":
    main()
