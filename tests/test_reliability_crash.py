"""Crash safety: SIGKILL the node (a real process) mid-receive, mid-processing, mid-forward.

After each restart the series must reach 'forwarded', nothing acknowledged to the modality may
be lost, and the destination must hold each instance once. One instance may be sent twice when
the kill falls between the destination's acknowledgement and the commit of its `sent` row; its
new UIDs are deterministic, so the archive overwrites the same instance. No more than that.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
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
from peers import NODELAY_ENV, REPO, require, storescu, wait_until

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
                assert (tmp_path / "data" / held[ds.SOPInstanceUID]).stat().st_size > 0

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


# -- kill -9 at five points of forwarding -------------------------------------------------------


def test_kill_at_five_points_of_forwarding_resends_at_most_the_instance_in_flight(tmp_path):
    """Each acknowledgement is committed before the next instance goes: after each kill the
    destination sees at most one C-STORE again (the one in flight), never a group."""
    count = 24
    files = write_series(make_series(count, "CT"), tmp_path / "in")
    # C-STORE numbers (at the destination, over all restarts) at which the node is killed:
    # "hold" kills it while the destination holds the request (stored, not yet answered);
    # "answer" kills it as soon as the answer is sent (before or after its commit).
    points = {3: "hold", 8: "answer", 13: "hold", 18: "answer", 23: "hold"}
    kill_now, killed = threading.Event(), [threading.Event()]

    def status_for(number: int, _sop_uid: str) -> int:
        if points.get(number) == "hold":
            dead = killed[-1]
            kill_now.set()
            dead.wait(20)  # answered only once the node is dead: nobody reads it
        elif points.get(number) == "answer":
            kill_now.set()
        return 0x0000

    with FaultySCP(delay=0.05, status_for=status_for) as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
        node = start_node(tmp_path, raw)
        try:
            assert storescu(node.port, files).returncode == 0
            for _ in points:
                assert kill_now.wait(60), "forwarding did not reach the next kill point"
                kill_now.clear()
                node.kill9()
                killed[-1].set()
                killed.append(threading.Event())
                node = start_node(tmp_path, raw)
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded")
        finally:
            killed[-1].set()
            node.stop()
        stored = scp.stored()
    assert len(set(stored)) == count
    resent = len(stored) - count
    assert resent <= len(points), f"{resent} instances sent again after {len(points)} kills"
    assert max(stored.count(uid) for uid in set(stored)) <= 2
    assert len(db_rows(db(tmp_path), "SELECT instance_id FROM sent")) == count


# -- one process per data folder, and a folder that moves ---------------------------------------


def test_second_node_on_the_same_folder_is_refused_while_the_first_receives(tmp_path):
    series = make_series(80, "CT")
    files = write_series(series, tmp_path / "in")
    with FaultySCP() as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
        node = start_node(tmp_path, raw)
        try:
            with storescu_in_background(node.port, files, tmp_path) as sender:
                second = node_raw(tmp_path / "data", [dicom_destination(scp)])
                config = write_config(tmp_path / "second.toml", second)
                refused = subprocess.run(
                    [sys.executable, "-m", "deid_node.cli", "serve", "--config", str(config)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    cwd=REPO,
                    env=NODELAY_ENV,
                )
                output, _ = sender.communicate(timeout=60)
            assert refused.returncode == 1, refused.stderr
            assert "in use by another deid-node process" in refused.stderr
            assert f"pid {node.proc.pid}" in refused.stderr
            assert sender.returncode == 0, output
            wait_until(lambda: all_forwarded(tmp_path), 90, what="series forwarded")
        finally:
            node.stop()
        stored = scp.stored()
    assert len(set(stored)) == len(series), "an acknowledged instance was lost"
    assert len(stored) == len(series), "an instance was forwarded twice"
    assert not (tmp_path / "data" / "quarantine" / "orphans").exists()


def test_data_folder_moved_to_a_new_path_then_restarted_loses_nothing(tmp_path):
    count = 12
    files = write_series(make_series(count, "CT"), tmp_path / "in")
    scp = FaultySCP()  # not started yet: the destination is down at first
    raw = node_raw(tmp_path / "data", [dicom_destination(scp)], stable_seconds=1)
    node = start_node(tmp_path, raw)
    try:
        assert storescu(node.port, files).returncode == 0
        wait_until(
            lambda: db_rows(db(tmp_path), "SELECT id FROM deliveries WHERE attempts >= 1"),
            60,
            what="a failed delivery attempt",
        )
        node.kill9()
    finally:
        node.stop()
    shutil.move(tmp_path / "data", tmp_path / "new disk")
    raw["node"]["data_dir"] = str(tmp_path / "new disk")
    with scp:
        node = start_node(tmp_path, raw)
        try:
            moved_db = tmp_path / "new disk" / "deid-node.sqlite"
            wait_until(
                lambda: db_rows(moved_db, "SELECT state FROM batches") == [{"state": "forwarded"}],
                90,
                what="series forwarded from the moved folder",
            )
        finally:
            node.stop()
        stored = scp.stored()
    assert len(stored) == len(set(stored)) == count
    assert not (tmp_path / "new disk" / "quarantine" / "orphans").exists(), "files moved aside"
    assert 'orphan_spool_files_moved": 0' in (tmp_path / "node.log").read_text()
