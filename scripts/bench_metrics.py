#!/usr/bin/env python3
"""What a /metrics scrape and the console's list pages cost on a large database.

Fills a fresh store with N instances (100 per series round, 1 in 50 quarantined, each sent to
one destination), then times the console's Prometheus collector (first scrape: every row;
later ones: received and refused read only the rows added since) and the first page of
/quarantine and /series.

Run: `.venv/bin/python scripts/bench_metrics.py [--instances 200000]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from deid_node.console.metrics import DatabaseCollector, NodeView
from deid_node.store import Store
from deid_node.store import metrics_queries as mq


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


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200_000)
    args = parser.parse_args()
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
