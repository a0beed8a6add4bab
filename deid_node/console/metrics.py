"""/metrics: Prometheus families read from the node's database at scrape time, and /healthz.

Counting in the database (instead of in-process counters) makes the figures right whichever
thread or worker process did the work, and keeps them across restarts. Durations come from the
series rounds' summaries: processing time per round, and the OCR time of each file, measured in
the worker that read it and counted into buckets there (pipeline.seconds_histogram). Labels are AE titles,
DIMSE statuses, states, destination names and reason kinds: never a patient value.

The append-only tables are added up in memory, so that a scrape's cost does not grow with the
node's history (a new process reads them all once): `processed` (the histograms) from the row
after the last one counted (its rows become visible in id order), `instances`, `refused` and
`sent` (received, refused and forwarded counters) settled up to a watermark that trails the
highest id by metrics_queries.APPENDED_MARGIN, the rows above it counted afresh at each scrape
(replicas make them visible out of id order).
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from deid_node.pipeline import OCR_SECONDS_BUCKETS
from deid_node.store import BATCH_STATES, Store
from deid_node.store import metrics_queries as mq
from deid_node.store.engine import StoreUnavailableError

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class NodeView:
    """What the console needs of the running node (deid_node/node.py provides it)."""

    store: Store
    scp_listening: Callable[[], bool]
    destinations_up: Callable[[], dict[str, bool]]
    request_reprocess: Callable[[], None] = lambda: None
    # series.policy: under "all" a series held back once stays held (pipeline.judge_series
    # counts earlier rounds), so a released file would only be skipped: release is refused.
    series_policy: str = "all"
    # node.max_decoded_mb in bytes (0: no limit): a thumbnail above it is not rendered.
    max_decoded_bytes: int = 0


class RunningHistogram:
    """A Prometheus histogram's running totals: observations at or under each bound, count,
    sum (added in the order observed, as a sum over the same values in that order gives).
    Cheap per observation: a first scrape adds up every round the node ever processed."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._names = tuple(str(b) for b in bounds)
        self._slots = [0] * (len(bounds) + 1)  # observations over bounds[i - 1], up to bounds[i]
        self._added = [0] * len(bounds)  # at or under each bound, from histograms added
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count, self.sum = self.count + 1, self.sum + value
        self._slots[len(self.bounds) if math.isnan(value) else bisect_left(self.bounds, value)] += 1

    def add_series(self, text: str | None) -> None:
        """A round's OCR seconds (pipeline.seconds_histogram, as JSON): its counts added. A
        bound the round does not name (written with other bounds) counts its nearest lower
        one; a histogram that does not parse counts nothing."""
        try:
            ocr = json.loads(text) if text else None
            if not isinstance(ocr, dict):
                return
            buckets = ocr["buckets"]
            if tuple(buckets) == self._names:  # written with these bounds: the usual case
                counts = list(accumulate((int(buckets[b]) for b in self._names), max))
            else:
                written = sorted((float(b), int(n)) for b, n in buckets.items())
                counts = [
                    max((n for b, n in written if b <= bound), default=0) for bound in self.bounds
                ]
            self.count, self.sum = self.count + int(ocr["count"]), self.sum + float(ocr["sum"])
        except (ValueError, AttributeError, KeyError, TypeError):
            return
        self._added = [a + n for a, n in zip(self._added, counts, strict=True)]

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        at_or_under = [a + n for a, n in zip(accumulate(self._slots), self._added, strict=False)]
        buckets = [(b, n) for b, n in zip(self._names, at_or_under, strict=False)]
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


Totals = dict[Any, tuple[int, ...]]  # label values -> counter values (count, bytes...)


def _sum(*parts: tuple[int, ...]) -> tuple[int, ...]:
    """Counter values added position by position."""
    return tuple(map(sum, zip(*parts, strict=True)))


class SettledCounts:
    """The counters of one append-only table (instances, refused or sent), by label, right while
    replicas make rows visible out of id order: no state per row. The rows at or under the
    watermark (the highest id seen less metrics_queries.APPENDED_MARGIN) are settled, added
    here once as the watermark passes them; those above it are counted afresh at each scrape.

    A scrape exposes settled + live, and never less than it exposed before, label by label
    and value by value: a live row can still change or go (a re-sent instance replaces its
    row's calling AE and size while its series receives; start-up drops a receipt never
    acknowledged), and a Prometheus counter that goes down reads as a restart. Such a counter
    then stays where it was until the rows counted pass it again."""

    def __init__(self) -> None:
        self.watermark = 0
        self._settled: Totals = {}
        self._exposed: Totals = {}

    def settle(self, upto: int, totals: Totals) -> None:
        """The counts of the rows after the watermark up to `upto`, which becomes it."""
        for key, values in totals.items():
            self._settled[key] = _sum(self._settled.get(key, (0,) * len(values)), values)
        self.watermark = upto

    def expose(self, live: Totals) -> Totals:
        """What a scrape shows, given the counts of the rows above the watermark."""
        for key in self._settled.keys() | live.keys():
            total = _sum(*(counted[key] for counted in (self._settled, live) if key in counted))
            before = self._exposed.get(key, total)
            self._exposed[key] = tuple(map(max, before, total))
        return dict(self._exposed)


def _received(rows: list[dict[str, Any]]) -> Totals:
    return {row["calling_ae"] or "": (row["n"], row["bytes"]) for row in rows}


def _refused(rows: list[dict[str, Any]]) -> Totals:
    return {(row["calling_ae"] or "", row["status"]): (row["n"],) for row in rows}


def _sent(rows: list[dict[str, Any]]) -> Totals:
    return {row["destination"]: (row["n"],) for row in rows}


class DatabaseCollector:
    def __init__(self, view: NodeView) -> None:
        self.view = view
        # Running totals of the append-only tables, so that a scrape reads only the rows
        # added since the last one (processed) or above a watermark (instances, refused, sent).
        self._lock = threading.Lock()
        self._after = {"processed": 0}
        self._appended = {
            "instances": SettledCounts(),
            "refused": SettledCounts(),
            "sent": SettledCounts(),
        }
        self._unordered_sent = False  # the `sent` rows without a place in the order, added
        self._durations = RunningHistogram(DURATION_BUCKETS)
        self._ocr = RunningHistogram(OCR_SECONDS_BUCKETS)

    def _appended_totals(self) -> dict[str, Totals]:
        """Received (calling AE -> count, bytes), refused ((calling AE, status) -> count,) and
        forwarded (destination -> count,) counters: the watermarks moved up to the heads less
        the margin (the rows passed settled), then the rows above them counted."""
        store, by_table = self.view.store, self._appended
        with self._lock:
            if not self._unordered_sent:
                sent = by_table["sent"]
                sent.settle(sent.watermark, _sent(mq.sent_unordered(store)))
                self._unordered_sent = True
            heads = mq.appended_heads(store)
            after = {table: totals.watermark for table, totals in by_table.items()}
            upto = {
                table: max(after[table], heads[table] - mq.APPENDED_MARGIN) for table in by_table
            }
            if upto != after:
                passed = mq.appended_counts(store, after, upto)
                by_table["instances"].settle(upto["instances"], _received(passed["received"]))
                by_table["refused"].settle(upto["refused"], _refused(passed["refused"]))
                by_table["sent"].settle(upto["sent"], _sent(passed["sent"]))
            live = mq.appended_counts(store, upto)
            return {
                "received": by_table["instances"].expose(_received(live["received"])),
                "refused": by_table["refused"].expose(_refused(live["refused"])),
                "sent": by_table["sent"].expose(_sent(live["sent"])),
            }

    def _processed(self) -> tuple[HistogramMetricFamily, HistogramMetricFamily]:
        """The processing-time and OCR histograms with the rounds processed since the last
        scrape added, read a chunk at a time (memory stays bounded on a first scrape)."""
        with self._lock:
            while True:
                rows = mq.processed_after(
                    self.view.store, self._after["processed"], mq.PROCESSED_CHUNK
                )
                for row in rows:
                    if row["duration_s"] is not None:
                        self._durations.observe(float(row["duration_s"]))
                    self._ocr.add_series(row["ocr_seconds"])
                if rows:
                    self._after["processed"] = rows[-1]["id"]
                if len(rows) < mq.PROCESSED_CHUNK:
                    break
            return (
                self._durations.family(
                    "deid_node_series_processing_seconds",
                    "Time to process one series round (all its files), from the database",
                ),
                self._ocr.family(
                    "deid_node_ocr_seconds",
                    "Time of the pixel stage (decode, OCR, blanking) per file OCR read, measured"
                    " in the worker process and kept in each series round's summary",
                ),
            )

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (no query at registration)

    def collect(self) -> Iterator[Metric]:
        appended = self._appended_totals()
        durations, ocr = self._processed()
        counts = mq.metric_counts(self.view.store)
        received = CounterMetricFamily(
            "deid_node_instances_received",
            "Instances received and stored (DIMSE status 0x0000), by calling AE",
            labels=["calling_ae", "status"],
        )
        received_bytes = CounterMetricFamily(
            "deid_node_received_bytes", "Bytes of instances received", labels=["calling_ae"]
        )
        for ae, (count, size) in sorted(appended["received"].items()):
            received.add_metric([ae, "0x0000"], count)
            received_bytes.add_metric([ae], size)
        refused = CounterMetricFamily(
            "deid_node_instances_refused",
            "Instances refused by the SCP, by DIMSE status and calling AE",
            labels=["calling_ae", "status"],
        )
        for (ae, status), (count,) in sorted(appended["refused"].items()):
            refused.add_metric([ae, f"0x{status:04X}"], count)
        series = GaugeMetricFamily("deid_node_series", "Series rounds by state", labels=["state"])
        by_state = {row["state"]: row["n"] for row in counts["series"]}
        for state in BATCH_STATES:
            series.add_metric([state], by_state.get(state, 0))
        quarantined = CounterMetricFamily(
            "deid_node_files_quarantined", "Files quarantined, by kind of reason", labels=["reason"]
        )
        for row in counts["quarantined"]:
            quarantined.add_metric([row["reason"]], row["n"])
        deliveries = GaugeMetricFamily(
            "deid_node_deliveries",
            "Deliveries (one series round to one destination) by destination and state",
            labels=["destination", "state"],
        )
        for row in counts["deliveries"]:
            deliveries.add_metric([row["destination"], row["state"]], row["n"])
        sent = CounterMetricFamily(
            "deid_node_instances_forwarded",
            "De-identified instances acknowledged by a destination",
            labels=["destination"],
        )
        for destination, (count,) in sorted(appended["sent"].items()):
            sent.add_metric([destination], count)
        queue = GaugeMetricFamily(
            "deid_node_queue_depth",
            "Work waiting: series rounds not yet processed, deliveries pending",
            labels=["queue"],
        )
        queue.add_metric(["receiving"], by_state.get("receiving", 0))
        queue.add_metric(
            ["processing"], by_state.get("complete", 0) + by_state.get("processing", 0)
        )
        queue.add_metric(
            ["forwarding"],
            sum(r["n"] for r in counts["deliveries"] if r["state"] == "pending"),
        )
        yield from (received, received_bytes, refused, series, quarantined, deliveries, sent, queue)
        yield durations
        yield ocr
        up = GaugeMetricFamily(
            "deid_node_destination_up", "1 when the destination answers", labels=["destination"]
        )
        for name, is_up in sorted(self.view.destinations_up().items()):
            up.add_metric([name], 1 if is_up else 0)
        yield up
        disk = shutil.disk_usage(self.view.store.data_dir)
        yield GaugeMetricFamily(
            "deid_node_free_disk_bytes", "Free bytes on the data_dir file system", value=disk.free
        )
        yield GaugeMetricFamily(
            "deid_node_scp_listening",
            "1 when the C-STORE SCP listens",
            value=1 if self.view.scp_listening() else 0,
        )


def make_registry(view: NodeView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(view))  # type: ignore[arg-type]
    return registry


HEALTH_TIMEOUT_SECONDS = 5.0
_HEALTH_PROBE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healthz")


def health(view: NodeView) -> dict[str, Any]:
    """/healthz: the SCP listens and the database takes a write."""
    checks: dict[str, Any] = {"scp_listening": bool(view.scp_listening())}
    try:
        # Bounded: a writer stuck on the database (a full disk, a lock) must turn the check
        # red, not hang it. A probe still stuck makes the next ones wait behind it: red too.
        _HEALTH_PROBE.submit(mq.probe_writable, view.store).result(timeout=HEALTH_TIMEOUT_SECONDS)
        checks["database_writable"] = True
    except (sqlite3.Error, StoreUnavailableError, TimeoutError) as exc:
        checks["database_writable"] = False
        checks["database_error"] = type(exc).__name__
    checks["ok"] = checks["scp_listening"] and checks["database_writable"]
    return checks
