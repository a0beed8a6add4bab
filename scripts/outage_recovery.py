"""Measure how soon forwarding resumes after a destination outage (issue 13, item 5).

A node runs in-process with a destination's default backoff (5 s doubling, capped at 600 s) and
probe (C-ECHO, 0.5 s doubling, capped at probe_max_seconds); the destination (FaultySCP from
tests/faultpeers.py) is down when a 3-instance series arrives, stays down for --outage seconds
after the first failed attempt (plus a random 0-5 s, so that the return falls anywhere between
two probes), then comes back. Prints, per run, the outage and the seconds from the return to
the last instance stored. A measurement, not a test:

    .venv/bin/python scripts/outage_recovery.py --outage 30 45 --runs 3
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicomgen import make_series, write_series  # noqa: E402
from faultpeers import FaultySCP, node_raw  # noqa: E402
from peers import storescu, wait_until  # noqa: E402

from deid_node.config import parse_config  # noqa: E402
from deid_node.node import Node  # noqa: E402


def one_run(outage: float, probe_max: float, base: Path) -> tuple[float, float]:
    """Returns (seconds down after the first failed attempt, seconds from return to stored)."""
    scp = FaultySCP()
    dest = {
        "name": "research",
        "type": "dicom",
        "ae_title": scp.ae_title,
        "host": "127.0.0.1",
        "port": scp.port,
        "probe_max_seconds": probe_max,
    }
    # `base`, not the default temporary folder: the node points tempfile at its own data_dir.
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        node = Node(parse_config(node_raw(Path(tmp) / "data", [dest])))
        node.start()
        try:
            files = write_series(make_series(3, "CT"), Path(tmp) / "in")
            assert storescu(node.port, files).returncode == 0
            wait_until(
                lambda: node.store.query("SELECT id FROM deliveries WHERE attempts >= 1"),
                60,
                interval=0.05,
                what="first failed attempt",
            )
            failed = time.monotonic()
            time.sleep(outage + random.uniform(0, 5))
            with scp:
                back = time.monotonic()
                wait_until(lambda: len(scp.stored()) == 3, 700, interval=0.05, what="stored")
                return back - failed, time.monotonic() - back
        finally:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, nargs="+", default=[30.0, 45.0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--probe-max", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        for outage in args.outage:
            for run in range(1, args.runs + 1):
                down, seconds = one_run(outage, args.probe_max, Path(base))
                print(
                    f"outage {down:.1f} s (run {run}): resumed {seconds:.2f} s after the return",
                    flush=True,
                )


if __name__ == "__main__":
    main()
