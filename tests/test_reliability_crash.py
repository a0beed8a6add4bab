"""Crash safety: SIGKILL the node (a real process) mid-receive, mid-processing, mid-forward.

After each restart the series must reach 'forwarded', nothing acknowledged to the modality may
be lost, and the destination must hold each instance once. One instance may be sent twice when
the kill falls between the destination's acknowledgement and the commit of its `sent` row; its
new UIDs are deterministic, so the archive overwrites the same instance. No more than that.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_series, write_series
from faultpeers import (
    FaultySCP,
    KillableNode,
    associate,
    db_rows,
    dicom_destination,
    node_raw,
    write_config,
)
from peers import NODELAY_ENV, require, storescu, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]


def start_node(tmp_path: Path, raw: dict) -> KillableNode:
    config = write_config(tmp_path / "node.toml", raw)
    return KillableNode(config, raw["node"]["port"], tmp_path / "node.log").start()


def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "deid-node.sqlite"


def all_forwarded(tmp_path: Path):
    rows = db_rows(db(tmp_path), "SELECT state FROM batches")
    return rows and all(r["state"] == "forwarded" for r in rows) and rows


@contextlib.contextmanager
def storescu_in_background(port: int, files: list, tmp_path) -> Iterator[subprocess.Popen]:
    """storescu sending `files`, yielded once the node committed 20 rows; never outlives the block."""
    cmd = [require("storescu"), "-v", "-aet", "MODALITY", "-aec", "DEID_NODE", "-to", "20"]
    sender = subprocess.Popen(
        [*cmd, "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=NODELAY_ENV,
    )
    try:
        wait_until(
            lambda: len(db_rows(db(tmp_path), "SELECT id FROM instances")) >= 20,
            30,
            interval=0.01,
            what="20 instances received",
        )
        yield sender
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=10)


def test_kill_mid_receive_loses_nothing_acknowledged(tmp_path):
    series = make_series(100, "CT")
    files = write_series(series, tmp_path / "in")
    with FaultySCP() as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=4)
        node = start_node(tmp_path, raw)
        try:
            with storescu_in_background(node.port, files, tmp_path) as sender:
                node.kill9()
                output, _ = sender.communicate(timeout=30)
            acked = len(re.findall(r"Received Store Response \(Success\)", output))
            assert 20 <= acked < len(files), f"kill did not land mid-receive ({acked} acked)"
            # Everything storescu saw acknowledged is committed, with its bytes in the spool.
            rows = db_rows(db(tmp_path), "SELECT sop_uid, spool_path FROM instances")
            held = {r["sop_uid"]: r["spool_path"] for r in rows}
            for ds in series[:acked]:
                assert ds.SOPInstanceUID in held, "an acknowledged instance was lost"
                assert Path(held[ds.SOPInstanceUID]).stat().st_size > 0

            # The modality re-sends the whole series, as it would after a failed association.
            node = start_node(tmp_path, raw)
            resent = storescu(node.port, files)
            assert resent.returncode == 0, resent.stderr
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded")
        finally:
            node.stop()
        stored = scp.stored()
    assert len(set(stored)) == len(files)
    assert len(stored) == len(files), "an instance was forwarded twice"


def test_kill_mid_processing_resumes_the_series(tmp_path):
    series = make_series(150, "CT")
    files = write_series(series, tmp_path / "in")
    with FaultySCP() as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
        node = start_node(tmp_path, raw)
        try:
            assert storescu(node.port, files).returncode == 0
            wait_until(
                lambda: db_rows(db(tmp_path), "SELECT id FROM batches WHERE state = 'processing'"),
                30,
                interval=0.01,
                what="batch in processing",
            )
            node.kill9()
            assert db_rows(db(tmp_path), "SELECT state FROM batches") == [{"state": "processing"}]
            assert not scp.calls, "nothing may leave before processing finished"
            node = start_node(tmp_path, raw)
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded")
        finally:
            node.stop()
        stored = scp.stored()
    assert 'requeued_processing": 1' in (tmp_path / "node.log").read_text()
    assert len(set(stored)) == len(files)
    assert len(stored) == len(files), "an instance was forwarded twice"
    reports = db_rows(db(tmp_path), "SELECT report FROM instances WHERE report IS NOT NULL")
    assert len(reports) == len(files)


def test_kill_mid_forward_sends_each_instance_once(tmp_path):
    count = 30
    files = write_series(make_series(count, "CT"), tmp_path / "in")
    with FaultySCP(delay=0.15) as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
        node = start_node(tmp_path, raw)
        try:
            assert storescu(node.port, files).returncode == 0
            wait_until(
                lambda: len(db_rows(db(tmp_path), "SELECT instance_id FROM sent")) >= 5,
                60,
                interval=0.01,
                what="some instances sent",
            )
            node.kill9()
            sent_before = len(db_rows(db(tmp_path), "SELECT instance_id FROM sent"))
            assert 5 <= sent_before < count, "kill did not land mid-forward"
            assert db_rows(db(tmp_path), "SELECT state FROM batches") == [{"state": "forwarding"}]
            time.sleep(0.3)  # the destination finishes the C-STORE it was answering
            node = start_node(tmp_path, raw)
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded")
        finally:
            node.stop()
        stored = scp.stored()
    assert len(set(stored)) == count
    # At most the one instance in flight at the kill is sent again (same new UID: overwritten).
    assert count <= len(stored) <= count + 1
    assert len(db_rows(db(tmp_path), "SELECT instance_id FROM sent")) == count


# -- graceful stop ----------------------------------------------------------------------------


def test_sigterm_while_receiving_stops_accepting_and_loses_nothing(tmp_path):
    series = make_series(200, "CT", rows=256, columns=256)
    files = write_series(series, tmp_path / "in")
    with FaultySCP() as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
        node = start_node(tmp_path, raw)
        try:
            with storescu_in_background(node.port, files, tmp_path) as sender:
                node.proc.send_signal(signal.SIGTERM)
                # No new association once the stop began (the one in progress may go on).
                wait_until(
                    lambda: not associate(node.port, timeout=2).is_established,
                    5,
                    interval=0.05,
                    what="new associations refused",
                )
                assert node.proc.wait(timeout=30) == 0, "SIGTERM did not exit 0"
                output, _ = sender.communicate(timeout=30)
            node.log.close()
            acked = len(re.findall(r"Received Store Response \(Success\)", output))
            held = {r["sop_uid"] for r in db_rows(db(tmp_path), "SELECT sop_uid FROM instances")}
            assert acked >= 20
            assert {ds.SOPInstanceUID for ds in series[:acked]} <= held, "acknowledged but lost"
            node = start_node(tmp_path, raw)
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded after restart")
        finally:
            node.stop()
        stored = scp.stored()
    assert len(stored) == len(set(stored)) == len(held)


def test_sigterm_exits_promptly_after_a_bare_tcp_probe(tmp_path):
    """A port probe (connect, close, no A-ASSOCIATE-RQ) must not hold a graceful stop."""
    with FaultySCP() as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], network_timeout_seconds=20)
        node = start_node(tmp_path, raw)  # wait_for_port connects and closes: the probe
        node.proc.send_signal(signal.SIGTERM)
        try:
            code = node.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            node.stop()
    assert code == 0, "still running 8 s after SIGTERM"
