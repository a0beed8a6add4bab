"""A worker process of the node's pool dies (SIGKILL here; a decoder crash or the OOM killer in
life): the shared pool is broken for every series using it, though none of them caused it. No
series may be charged a processing attempt or lose a file for it: the files it took down run
again alone, and the next series get a new pool. The node runs in-process against FaultySCP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from dicomgen import make_series, write_series
from faultpeers import FaultySCP, descendants, dicom_destination, node_raw
from peers import storescu, wait_until

from deid_node.config import parse_config
from deid_node.node import Node

pytestmark = [pytest.mark.network]


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def pool_workers() -> list[int]:
    """Worker processes under this test process: children of multiprocessing's forkserver
    (itself a child of this process), whichever node's pool they serve."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            if parent_of(pid) != os.getpid():
                found.append(pid)
        except OSError:
            continue  # exited meanwhile
    return found


def test_dead_worker_charges_no_series_and_the_next_series_get_a_new_pool(tmp_path):
    with FaultySCP() as scp:
        node = Node(parse_config(node_raw(tmp_path / "data", [dicom_destination(scp)])))
        node.start()
        try:
            workers = wait_until(
                lambda: len(pool_workers()) >= 2 and pool_workers(), 30, what="2 pool workers"
            )
            os.kill(workers[0], signal.SIGKILL)  # breaks the idle pool
            for n, count in ((1, 3), (2, 2)):
                files = write_series(make_series(count, "CT"), tmp_path / f"in{n}")
                assert storescu(node.port, files).returncode == 0
                wait_until(
                    lambda n=n: [
                        b
                        for b in node.store.query("SELECT * FROM batches")
                        if b["state"] in ("forwarded", "failed", "rejected")
                    ][n - 1 : n],
                    60,
                    what=f"series {n} settled",
                )
            batches = node.store.query("SELECT * FROM batches ORDER BY id")
            assert [b["state"] for b in batches] == ["forwarded", "forwarded"]
            assert [b["processing_attempts"] for b in batches] == [1, 1], "nobody is charged"
            states = {r["state"] for r in node.store.query("SELECT state FROM instances")}
            assert states == {"processed"}, "no file quarantined for a worker it did not kill"
        finally:
            node.stop()
    assert len(set(scp.stored())) == 5
