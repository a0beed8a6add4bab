#!/usr/bin/env python3
"""Forwarding throughput under three commit policies for destination acknowledgements.

Issue 13 item 2: each acknowledgement is committed before the next instance is sent. This
measures what that costs: `send_batch` from a real store to DCMTK storescp (TCP_NODELAY=1) and to
a folder, with the `sent` rows committed
- group16-full: one power-safe (fsync) transaction per 16 acknowledgements (the node before);
- ack-normal: one transaction per acknowledgement, WAL commit without fsync (the node now);
- ack-full: one fsync'ed transaction per acknowledgement.

Run: `.venv/bin/python scripts/bench_acks.py [--count 200] [--rounds 3]` (needs storescp).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicomgen import make_series, write_series  # noqa: E402
from peers import NODELAY_ENV, free_port, require, wait_for_port  # noqa: E402

from deid_node.config import DestinationConfig  # noqa: E402
from deid_node.errors import ForwardError  # noqa: E402
from deid_node.forward import Outgoing, send_batch  # noqa: E402
from deid_node.scp import enable_chunked_receive  # noqa: E402
from deid_node.store import Receipt, Store  # noqa: E402

MODES = ("group16-full", "ack-normal", "ack-full")


def prepared_store(work: Path, count: int) -> tuple[Store, list[Outgoing]]:
    """A store holding `count` instances of a 256x256 CT series, ready to forward."""
    store = Store(work / "data")
    enable_chunked_receive(work / "data" / "tmp")
    series = make_series(count, "CT", rows=256, columns=256)
    files = write_series(series, work / "in")
    items = []
    for ds, path in zip(series, files, strict=True):
        receipt = Receipt(
            ds.SOPInstanceUID,
            ds.SOPClassUID,
            ds.SeriesInstanceUID,
            ds.StudyInstanceUID,
            str(ds.file_meta.TransferSyntaxUID),
            "MODALITY",
            "127.0.0.1",
        )
        spooled = store.spool_adopt(store.tmp_write(path.read_bytes()))
        stored = store.record_instance(receipt, spooled, path.stat().st_size)
        items.append(
            Outgoing(stored.id, path, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        )
    with store.transaction() as conn:
        conn.execute("UPDATE instances SET report = '{}'")
    return store, items


def instances_per_second(
    store: Store, items: list[Outgoing], dest: DestinationConfig, mode: str
) -> float:
    with store.transaction() as conn:
        conn.execute("DELETE FROM sent")
    pending: list[tuple[int, str, str, int]] = []
    plain = Store.transaction

    def power_safe_always(self: Store, *, power_safe: bool = True):  # noqa: ANN202
        return plain(self, power_safe=True)

    def on_stored(item: Outgoing, url: str, status: int) -> None:
        if mode == "group16-full":
            pending.append((item.instance_id, dest.name, url, status))
            if len(pending) >= 16:
                store.mark_sent(pending)
                pending.clear()
        else:
            store.mark_sent([(item.instance_id, dest.name, url, status)])

    if mode != "ack-normal":
        Store.transaction = power_safe_always  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        send_batch(dest, items, on_stored, lambda *_args: None)
        store.mark_sent(pending)
        elapsed = time.perf_counter() - started
    finally:
        Store.transaction = plain  # type: ignore[method-assign]
    assert store.query("SELECT COUNT(*) AS n FROM sent")[0]["n"] == len(items)
    return len(items) / elapsed


def commit_cost_ms(store: Store, items: list[Outgoing], mode: str) -> float:
    """Milliseconds of store work per acknowledgement, with no network or copy at all."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM sent")
    plain = Store.transaction

    def power_safe_always(self: Store, *, power_safe: bool = True):  # noqa: ANN202
        return plain(self, power_safe=True)

    if mode != "ack-normal":
        Store.transaction = power_safe_always  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        acks = [(item.instance_id, "x", "url", 0) for item in items]
        if mode == "group16-full":
            for start in range(0, len(acks), 16):
                store.mark_sent(acks[start : start + 16])
        else:
            for ack in acks:
                store.mark_sent([ack])
        elapsed = time.perf_counter() - started
    finally:
        Store.transaction = plain  # type: ignore[method-assign]
    return 1000 * elapsed / len(items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-acks-"))
    port = free_port()
    (work / "scp").mkdir()
    scp = subprocess.Popen(
        [require("storescp"), "-aet", "BENCH", "-od", str(work / "scp"), "+B", str(port)],
        env=NODELAY_ENV,
    )
    try:
        wait_for_port(port, 20, scp)
        store, items = prepared_store(work, args.count)
        dcmtk = DestinationConfig(
            name="dcmtk",
            type="dicom",
            ae_title="BENCH",
            host="127.0.0.1",
            port=port,
            calling_ae_title="DEID_NODE",
        )
        results: dict[tuple[str, str], list[float]] = {}
        for number in range(args.rounds):
            for mode in MODES:
                folder = DestinationConfig(
                    name="folder", type="folder", path=work / f"out-{mode}-{number}"
                )
                for dest in (dcmtk, folder):
                    try:
                        rate = instances_per_second(store, items, dest, mode)
                    except ForwardError as exc:  # storescp on a loaded machine, now and then
                        print(f"{dest.name} {mode}: round {number} failed: {exc}")
                        continue
                    results.setdefault((dest.name, mode), []).append(rate)
        costs = {
            mode: [commit_cost_ms(store, items, mode) for _ in range(args.rounds)] for mode in MODES
        }
        print(f"{args.count} instances, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
        for mode, values in costs.items():
            print(
                f"store   {mode:13} median {statistics.median(values):6.2f} ms per acknowledgement"
            )
        for (name, mode), rates in results.items():
            low, mid, high = min(rates), statistics.median(rates), max(rates)
            print(f"{name:7} {mode:13} median {mid:6.1f} ({low:.1f} - {high:.1f}) instances/s")
        store.close()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
