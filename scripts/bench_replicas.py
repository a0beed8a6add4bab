#!/usr/bin/env python3
"""Replicas on one PostgreSQL (issue 18): throughput of 1 and 3 replicas, and how long a dead
replica's work takes to be taken over.

    .venv/bin/python scripts/bench_replicas.py [--instances 300] [--lease 5] [--senders 3]

Everything is real: a temporary PostgreSQL cluster (tests/pgcluster.py), `deid-node serve`
replicas, DCMTK storescu, a real Orthanc. Throughput: `--instances` CT images (64x64,
REDACT_NO_TEXT) sent by `--senders` storescu processes at once, each to its own replica
(round robin), from the first byte until Orthanc holds every instance. Takeover: a series
whose processing is slowed by OCR (REDACT_ALL_TEXT); the replica holding its claim is killed
with SIGKILL; the time until another replica claims the batch, and until the series is in
Orthanc, is printed.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicomgen import make_series, write_series  # noqa: E402
from faultpeers import KillableNode, node_raw, write_config  # noqa: E402
from peers import storescu  # noqa: E402
from pgcluster import create_database, start_cluster, stop_cluster  # noqa: E402
from test_replicas import (  # noqa: E402
    counting_orthanc,
    orthanc_destination,
    pg_rows,
    running_replicas,
)


def _wait(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout} s")


def send_all(ports: list[int], files: list[Path], senders: int) -> None:
    chunks = [files[i::senders] for i in range(senders)]
    with ThreadPoolExecutor(senders) as pool:
        sent = list(
            pool.map(
                lambda item: storescu(ports[item[0] % len(ports)], item[1], timeout=600),
                enumerate(chunks),
            )
        )
    failed = [s for s in sent if s.returncode]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0].stderr[-600:]}")


def throughput_sqlite(work: Path, files: list[Path], senders: int) -> float:
    """The same run on one node with its embedded SQLite store (the baseline)."""
    with counting_orthanc(work / "orthanc-sqlite") as pacs:
        raw = node_raw(work / "sqlite", [orthanc_destination(pacs)], workers=1)
        raw["series"]["stable_seconds"] = 1
        node = KillableNode(
            write_config(work / "sqlite.toml", raw), raw["node"]["port"], work / "sqlite.log"
        ).start()
        try:
            started = time.monotonic()
            send_all([node.port], files, senders)
            _wait(lambda: pacs.count_instances() >= len(files), 900, "all in Orthanc")
            return len(files) / (time.monotonic() - started)
        finally:
            node.stop()


def throughput(cluster, work: Path, replicas: int, files: list[Path], senders: int) -> float:
    url = create_database(cluster, f"bench_{replicas}_{int(time.time())}")
    (work / f"r{replicas}").mkdir()
    with (
        counting_orthanc(work / f"orthanc-{replicas}") as pacs,
        running_replicas(
            work / f"r{replicas}", replicas, url=url, pacs=pacs, stable_seconds=1
        ) as reps,
    ):
        started = time.monotonic()
        send_all(reps.ports, files, senders)
        _wait(lambda: pacs.count_instances() >= len(files), 900, "all in Orthanc")
        return len(files) / (time.monotonic() - started)


def takeover(cluster, work: Path, lease: float) -> dict[str, float]:
    url = create_database(cluster, f"takeover_{int(time.time())}")
    (work / "kill").mkdir()
    series = make_series(4, "CT", rows=256, columns=256)
    files = write_series(series, work / "slow")
    with (
        counting_orthanc(work / "orthanc-kill") as pacs,
        running_replicas(
            work / "kill", 3, url=url, pacs=pacs, mode="REDACT_ALL_TEXT", lease_seconds=lease
        ) as reps,
    ):
        assert storescu(reps.ports[0], files).returncode == 0
        claimed = []
        _wait(
            lambda: (
                claimed.extend(
                    pg_rows(url, "SELECT claimed_by FROM batches WHERE state = 'processing'")
                )
                or any(r["claimed_by"] for r in claimed)
            ),
            120,
            "a replica claims the series",
        )
        holder = next(r["claimed_by"] for r in claimed if r["claimed_by"])
        reps.by_id(holder).kill9()
        killed = time.monotonic()

        def reclaimed() -> bool:
            rows = pg_rows(url, "SELECT claimed_by, state FROM batches")
            return any(r["claimed_by"] not in (None, holder) for r in rows) or any(
                r["state"] == "forwarded" for r in rows
            )

        _wait(reclaimed, lease + 60, "another replica claims it")
        taken = time.monotonic() - killed
        _wait(lambda: pacs.count_instances() >= len(files), 300, "series in Orthanc")
        return {"claimed_again_s": taken, "in_orthanc_s": time.monotonic() - killed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--lease", type=float, default=5.0)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as folder:
        work = Path(folder)
        work.chmod(0o755)  # the cluster runs as an unprivileged user, under this folder
        (work / "pg").mkdir()
        cluster = start_cluster(work / "pg")
        try:
            files = write_series(make_series(args.instances, "CT"), work / "in")
            baseline = throughput_sqlite(work, files, args.senders)
            rates = {n: throughput(cluster, work, n, files, args.senders) for n in (1, 3)}
            kill = takeover(cluster, work, args.lease)
        finally:
            stop_cluster(cluster)
    print(
        f"# bench_replicas {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"{platform.node()}, {len(__import__('os').sched_getaffinity(0))} CPUs"
    )
    print(
        f"{args.instances} CT instances, {args.senders} storescu at once, REDACT_NO_TEXT,"
        " first byte sent to every instance in Orthanc; node.workers = 1 per node"
    )
    print(f"  1 node on SQLite (baseline): {baseline:.1f} instances/s")
    for n, rate in rates.items():
        print(f"  {n} replica(s) on PostgreSQL: {rate:.1f} instances/s")
    print(
        f"takeover, lease_seconds = {args.lease:g}: series claimed again"
        f" {kill['claimed_again_s']:.1f} s after kill -9, in Orthanc after"
        f" {kill['in_orthanc_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
