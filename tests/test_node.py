"""The node in-process: late files, destination outages with backoff, restart, retry."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from dicomgen import make_instance, make_series, write_series
from peers import Orthanc, free_port, storescu, wait_until

from deid_node.cli import main as cli_main
from deid_node.config import parse_config
from deid_node.node import Node

pytestmark = [pytest.mark.network]


def node_config(tmp_path: Path, destination: dict, **series) -> dict:
    return {
        "node": {
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(tmp_path / "data"),
            "min_free_disk_mb": 1,
            "poll_seconds": 0.2,
        },
        "series": {"stable_seconds": 1, **series},
        "deid": {"redact_pixels_mode": "REDACT_NO_TEXT"},
        "save_conditions": [{"type": "NOT_SUBSTR", "value": "PRIMARY", "dicom_tag": "ImageType"}],
        "destinations": [destination],
    }


def start(raw: dict) -> Node:
    node = Node(parse_config(raw))
    node.start()
    return node


def batches(node: Node) -> list[dict]:
    return node.store.query("SELECT * FROM batches ORDER BY id")


def settled(node: Node, count: int):
    rows = batches(node)
    final = [r for r in rows if r["state"] in ("forwarded", "rejected", "failed")]
    return len(rows) == count and len(final) == count and rows


def test_late_instance_opens_a_new_round_and_is_reported(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    node = start(raw)
    try:
        series = make_series(3, "CT")
        paths = write_series(series, tmp_path / "in")
        assert storescu(node.port, paths[:2]).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="first round forwarded")
        assert storescu(node.port, paths[2:]).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 60, what="late round forwarded")
        assert [(r["round"], r["state"]) for r in rows] == [(1, "forwarded"), (2, "forwarded")]
        reports = node.store.reports(series_uid=series[0].SeriesInstanceUID)
        assert len(reports) == 3
        late = [r for r in reports if r.get("late")]
        assert len(late) == 1 and late[0]["round"] == 2
        assert late[0]["SeriesInstanceUID_deid"] == reports[0]["SeriesInstanceUID_deid"]
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3
    finally:
        node.stop()


def test_late_file_of_a_rejected_series_stays_rejected(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    node = start(raw)
    try:
        series = make_series(3, "CT")
        series[0].ImageType = ["ORIGINAL", "PRIMARY"]
        paths = write_series(series, tmp_path / "in")
        assert storescu(node.port, paths[:2]).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="first round judged")
        assert storescu(node.port, paths[2:]).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 60, what="late round judged")
        assert [r["state"] for r in rows] == ["rejected", "rejected"]
        late = [r for r in node.store.reports() if r.get("late")][0]
        assert late["save_condition"] is True and late["save_condition_series_agg"] is False
        assert late["save_disabling_urls_series_agg"] == [
            f"dicom://MODALITY/{series[0].SOPInstanceUID}"
        ]
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))
    finally:
        node.stop()


def test_destination_down_then_up_across_a_restart(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc")
    dest = {
        "name": "research",
        "type": "dicom",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "backoff_initial_seconds": 0.5,
        "backoff_max_seconds": 1,
        "timeout_seconds": 5,
    }
    raw = node_config(tmp_path, dest)
    series = make_series(4, "CT")
    paths = write_series(series, tmp_path / "in")
    node = start(raw)
    try:
        assert storescu(node.port, paths).returncode == 0
        wait_until(
            lambda: node.store.query("SELECT attempts FROM deliveries WHERE attempts >= 2"),
            60,
            what="two failed delivery attempts",
        )
        delivery = node.store.query("SELECT * FROM deliveries")[0]
        assert delivery["state"] == "pending" and "cannot connect" in delivery["last_error"]
        assert batches(node)[0]["state"] == "forwarding"
    finally:
        node.stop()
    pacs.start()
    try:
        node = start(raw)  # a new process would do the same: all state is in SQLite
        try:
            wait_until(lambda: settled(node, 1), 60, what="delivered after restart")
            reports = node.store.reports()
            assert all(r["url_deid"].startswith(f"dicom://{pacs.aet}@") for r in reports)
            assert all(r["destinations"]["research"]["state"] == "sent" for r in reports)
        finally:
            node.stop()
        assert len(pacs.instances()) == 4
    finally:
        pacs.stop()


def test_failed_series_is_kept_and_retry_sends_it(tmp_path, capsys):
    pacs = Orthanc(tmp_path / "orthanc")
    dest = {
        "name": "research",
        "type": "dicom",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "max_attempts": 1,
        "timeout_seconds": 5,
    }
    raw = node_config(tmp_path, dest)
    config_path = tmp_path / "node.toml"
    config_path.write_text(_toml(raw))
    series = make_series(2, "CT")
    node = start(raw)
    try:
        assert storescu(node.port, write_series(series, tmp_path / "in")).returncode == 0
        rows = wait_until(lambda: settled(node, 1), 60, what="series failed")
        assert rows[0]["state"] == "failed"
        assert all(Path(r["deid_path"]).exists() for r in node.store.batch_instances(rows[0]["id"]))
        pacs.start()
        assert (
            cli_main(
                ["retry", "--config", str(config_path), "--series", series[0].SeriesInstanceUID]
            )
            == 0
        )
        assert "re-queued 1" in capsys.readouterr().out
        rows = wait_until(
            lambda: settled(node, 1) and batches(node)[0]["state"] == "forwarded" and batches(node),
            60,
            what="series forwarded after retry",
        )
        assert len(pacs.instances()) == 2
        assert cli_main(["status", "--config", str(config_path)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["batches"] == {"forwarded": 1}
    finally:
        node.stop()
        pacs.stop()


def test_originals_are_released_after_forwarding(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    node = start(raw)
    try:
        paths = write_series([make_instance("CT")], tmp_path / "in")
        assert storescu(node.port, paths).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="forwarded")
        wait_until(
            lambda: not list((tmp_path / "data" / "spool").rglob("*.dcm")), 10, what="spool emptied"
        )
        assert not list((tmp_path / "data" / "deid").rglob("*.dcm"))
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    finally:
        node.stop()


def _toml(raw: dict) -> str:
    lines = []
    for section in ("node", "series", "deid"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in raw[section].items()]
    for key in ("save_conditions", "destinations"):
        for entry in raw[key]:
            lines.append(f"[[{key}]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def test_toml_helper_round_trips(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": "x"})
    path = tmp_path / "c.toml"
    path.write_text(_toml(raw))
    from deid_node.config import load_config

    assert load_config(path).series.stable_seconds == 1.0
    time.sleep(0)


def test_a_killed_worker_process_is_replaced_and_no_series_is_charged(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    node = start(raw)
    try:
        first = write_series(make_series(2, "CT"), tmp_path / "a")
        assert storescu(node.port, first).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="first series forwarded")
        for pid in list(node._pool._processes):  # the de-identification worker processes
            os.kill(pid, signal.SIGKILL)
        second = write_series(make_series(2, "CT"), tmp_path / "b")
        assert storescu(node.port, second).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 60, what="second series forwarded")
        assert [r["state"] for r in rows] == ["forwarded", "forwarded"]
        # Its files ran again alone (pipeline); the series is not charged for a dead worker.
        assert rows[1]["processing_attempts"] == 1
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 4
    finally:
        node.stop()


def test_same_instance_re_sent_after_forwarding_is_acknowledged_and_not_sent_again(tmp_path):
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    node = start(raw)
    try:
        paths = write_series(make_series(2, "CT"), tmp_path / "in")
        assert storescu(node.port, paths).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="forwarded")
        assert storescu(node.port, paths).returncode == 0  # the modality sends it all again
        time.sleep(1.5)  # longer than stable_seconds: a new round would be complete by now
        assert len(batches(node)) == 1
        assert node.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
        assert len(node.store.reports()) == 2
        assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))
    finally:
        node.stop()


def test_node_and_batch_mode_give_the_same_new_uids_and_pseudonyms(tmp_path):
    """One installation secret, two front doors: the same original maps to the same output."""
    from pydicom import dcmread

    from deid_node import deidentify_dicom_files

    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    series = make_series(2, "CT")
    paths = write_series(series, tmp_path / "in")
    node = start(raw)
    try:
        assert storescu(node.port, paths).returncode == 0
        wait_until(lambda: settled(node, 1), 60, what="forwarded")
        by_node = {r["SOPInstanceUID"]: r for r in node.store.reports()}
    finally:
        node.stop()
    reports = deidentify_dicom_files(
        dicom_urls=paths, upload_dir=tmp_path / "batch", data_dir=tmp_path / "data"
    )
    for report in reports:
        twin = by_node[report["SOPInstanceUID"]]
        for key in ("StudyInstanceUID_deid", "SeriesInstanceUID_deid", "SOPInstanceUID_deid"):
            assert report[key] == twin[key]
        from_batch = dcmread(report["url_deid"])
        from_node = dcmread(twin["url_deid"])
        assert from_batch.PatientID == from_node.PatientID != series[0].PatientID
        assert from_batch.PatientName == from_node.PatientName
        assert from_batch.FrameOfReferenceUID == from_node.FrameOfReferenceUID


def test_destination_that_accepts_only_implicit_vr_gets_converted_files(tmp_path):
    """Files are streamed as stored when the destination takes their syntax; a destination
    that takes only Implicit VR Little Endian gets them re-encoded, not refused."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    received = []

    def on_store(event):
        received.append((str(event.context.transfer_syntax), event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="IMPLICIT_ONLY")
    scp.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    dest = {
        "name": "old",
        "type": "dicom",
        "ae_title": "IMPLICIT_ONLY",
        "host": "127.0.0.1",
        "port": port,
        "timeout_seconds": 10,
    }
    node = start(node_config(tmp_path, dest))
    try:
        assert (
            storescu(node.port, write_series(make_series(3, "CT"), tmp_path / "in")).returncode == 0
        )
        rows = wait_until(lambda: settled(node, 1), 60, what="forwarded")
        assert rows[0]["state"] == "forwarded"
        assert len(received) == 3 and {ts for ts, _ in received} == {ImplicitVRLittleEndian}
    finally:
        node.stop()
        server.shutdown()


# -- an open association holds its series; failed processing can be tried again ---------------


def test_series_of_a_slow_association_is_judged_in_one_round_after_its_release(tmp_path):
    """Instances 1.5 s apart with stable_seconds = 1: the series waits for the release."""
    from pydicom import dcmread
    from pynetdicom import AE

    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(tmp_path / "out")})
    series = make_series(4, "CT")
    paths = write_series(series, tmp_path / "in")
    node = start(raw)
    try:
        modality = AE(ae_title="MODALITY")
        modality.add_requested_context(
            series[0].SOPClassUID, str(dcmread(paths[0]).file_meta.TransferSyntaxUID)
        )
        assoc = modality.associate("127.0.0.1", node.port, ae_title="DEID_NODE")
        assert assoc.is_established
        try:
            for path in paths:
                assert assoc.send_c_store(dcmread(path)).Status == 0x0000
                time.sleep(1.5)  # longer than stable_seconds, association still open
            assert [(r["round"], r["state"]) for r in batches(node)] == [(1, "receiving")]
            assert not (tmp_path / "out").exists(), "forwarded while the association was open"
        finally:
            assoc.release()
        rows = wait_until(lambda: settled(node, 1), 60, what="series forwarded")
        assert [(r["round"], r["state"]) for r in rows] == [(1, "forwarded")]
        reports = node.store.reports()
        assert len(reports) == 4 and not any(r.get("late") for r in reports)
    finally:
        node.stop()


def _quarantine_one_by_an_unreadable_spool_file(tmp_path: Path, raw: dict, paths: list[Path]):
    """Receive the series with the node, make one spooled original unreadable while the node
    is down (as a failing disk would), and let a new node process the series: that instance
    is quarantined (the unreadable file kept), the others go.
    Returns (node, the original's good bytes, where the quarantine keeps it)."""
    from deid_node.store import Store

    raw["series"]["stable_seconds"] = 60  # not processed by this node
    node = start(raw)
    try:
        assert storescu(node.port, paths).returncode == 0
    finally:
        node.stop()
    store = Store(tmp_path / "data", readonly=True)
    spooled = Path(store.batch_instances(1)[1]["spool_path"])
    store.close()
    good = spooled.read_bytes()
    spooled.write_bytes(b"\0" * 64)
    raw["series"]["stable_seconds"] = 1
    node = start(raw)
    wait_until(lambda: settled(node, 1), 60, what="first round processed")
    quarantined = [r for r in node.store.reports() if r.get("quarantine")]
    assert len(quarantined) == 1, quarantined
    kept = Path(quarantined[0]["quarantine"])
    # The report names the quarantine in the commit; the file moves there right after it.
    wait_until(kept.exists, 30, what="the unreadable original moved into the quarantine")
    assert kept.read_bytes() == b"\0" * 64
    return node, good, kept


def test_retry_processes_a_quarantined_instance_again_once_the_cause_is_fixed(tmp_path, capsys):
    out = tmp_path / "out"
    raw = node_config(
        tmp_path, {"name": "out", "type": "folder", "path": str(out)}, policy="per_instance"
    )
    config_path = tmp_path / "node.toml"
    config_path.write_text(_toml({**raw, "series": {**raw["series"], "stable_seconds": 1}}))
    series = make_series(3, "CT")
    paths = write_series(series, tmp_path / "in")
    node, good, kept = _quarantine_one_by_an_unreadable_spool_file(tmp_path, raw, paths)
    try:
        assert len(list(out.rglob("*.dcm"))) == 2
        kept.write_bytes(good)  # the operator restored the file
        uid = series[0].SeriesInstanceUID
        assert cli_main(["retry", "--config", str(config_path), "--series", uid]) == 0
        assert "1 quarantined instances" in capsys.readouterr().out
        rows = wait_until(lambda: settled(node, 2), 60, what="second attempt processed")
        assert [(r["round"], r["state"]) for r in rows] == [(1, "forwarded"), (2, "forwarded")]
        assert len(list(out.rglob("*.dcm"))) == 3
        second = node.store.reports(series_uid=uid)[-1]
        assert second["attempt"] == 2 and second["url_deid"] and not second.get("error")
    finally:
        node.stop()


def test_retry_under_policy_all_forwards_the_whole_series_once(tmp_path, capsys):
    """Policy "all": one unreadable file holds the series back (nothing forwarded); once it is
    fixed, `retry` sends it again with the two the policy withheld: each exactly once."""
    out = tmp_path / "out"
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(out)}, policy="all")
    config_path = tmp_path / "node.toml"
    config_path.write_text(_toml({**raw, "series": {**raw["series"], "stable_seconds": 1}}))
    series = make_series(3, "CT")
    paths = write_series(series, tmp_path / "in")
    uid = series[0].SeriesInstanceUID
    node, good, kept = _quarantine_one_by_an_unreadable_spool_file(tmp_path, raw, paths)
    try:
        assert batches(node)[0]["state"] in ("rejected", "failed")
        assert list(out.rglob("*.dcm")) == []
        kept.write_bytes(good)  # the operator restored the file
        assert cli_main(["retry", "--config", str(config_path), "--series", uid]) == 0
        assert "1 quarantined instances" in capsys.readouterr().out
        rows = wait_until(lambda: settled(node, 2), 60, what="second round processed")
        assert [(r["round"], r["state"]) for r in rows][1] == (2, "forwarded")
        sent = sorted(p.name for p in out.rglob("*.dcm"))
        assert len(sent) == 3 and len(set(sent)) == 3, sent
        second = node.store.reports(series_uid=uid)[-3:]
        assert all(
            r["round"] == 2 and r["url_deid"] and r["save_condition_series_agg"] for r in second
        )
        assert sorted(r.get("attempt") or 1 for r in second) == [1, 1, 2]
        # Nothing is left to retry, and a second retry sends nothing again.
        assert cli_main(["retry", "--config", str(config_path), "--series", uid]) == 1
        assert len(list(out.rglob("*.dcm"))) == 3
    finally:
        node.stop()


def test_re_sent_quarantined_instance_under_policy_all_takes_the_withheld_ones(tmp_path):
    """Policy "all": the modality sends only the instance that was quarantined again (its
    cause fixed): the two withheld with it in round 1 go in its round, the series whole."""
    out = tmp_path / "out"
    raw = node_config(tmp_path, {"name": "out", "type": "folder", "path": str(out)}, policy="all")
    series = make_series(3, "CT")
    paths = write_series(series, tmp_path / "in")
    node, _good, _kept = _quarantine_one_by_an_unreadable_spool_file(tmp_path, raw, paths)
    try:
        assert list(out.rglob("*.dcm")) == []
        (bad,) = node.store.query("SELECT sop_uid FROM instances WHERE state = 'quarantined'")
        again = [
            p for p, ds in zip(paths, series, strict=True) if ds.SOPInstanceUID == bad["sop_uid"]
        ]
        assert storescu(node.port, again).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 60, what="re-sent instance processed")
        assert rows[1]["state"] == "forwarded"
        assert len(node.store.batch_instances(rows[1]["id"])) == 3
        assert len(list(out.rglob("*.dcm"))) == 3
        reports = node.store.reports(series_uid=series[0].SeriesInstanceUID)[-3:]
        assert sorted(r.get("attempt") or 1 for r in reports) == [1, 1, 2]
    finally:
        node.stop()


def test_re_sent_instance_that_was_quarantined_is_processed_again(tmp_path):
    out = tmp_path / "out"
    raw = node_config(
        tmp_path, {"name": "out", "type": "folder", "path": str(out)}, policy="per_instance"
    )
    series = make_series(3, "CT")
    paths = write_series(series, tmp_path / "in")
    node, _good, _kept = _quarantine_one_by_an_unreadable_spool_file(tmp_path, raw, paths)
    try:
        # The modality sends the whole series again, same bytes: only the quarantined one is
        # new work; the two forwarded ones are acknowledged and dropped.
        assert storescu(node.port, paths).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 60, what="re-sent instance processed")
        assert [r["state"] for r in rows] == ["forwarded", "forwarded"]
        assert len(node.store.batch_instances(rows[1]["id"])) == 1
        assert len(list(out.rglob("*.dcm"))) == 3
        report = node.store.reports(series_uid=series[0].SeriesInstanceUID)[-1]
        assert report["attempt"] == 2 and report["round"] == 2 and report["url_deid"]
    finally:
        node.stop()


def test_delivery_left_pending_after_its_last_acknowledgement_settles_without_sending(tmp_path):
    """A kill -9 after the last instance's acknowledgement was committed and before the
    delivery was marked done: after restart nothing is left to send, and the series settles."""
    import sqlite3

    from faultpeers import FaultySCP, dicom_destination

    with FaultySCP() as scp:
        raw = node_config(tmp_path, dicom_destination(scp))
        node = start(raw)
        try:
            paths = write_series(make_series(2, "CT"), tmp_path / "in")
            assert storescu(node.port, paths).returncode == 0
            wait_until(lambda: settled(node, 1), 60, what="forwarded")
        finally:
            node.stop()
        conn = sqlite3.connect(tmp_path / "data" / "deid-node.sqlite")
        with conn:  # the state that kill leaves behind
            conn.execute("UPDATE deliveries SET state = 'pending', attempts = 0")
            conn.execute("UPDATE batches SET state = 'forwarding', finished_at = NULL")
        conn.close()
        node = start(raw)
        try:
            rows = wait_until(lambda: settled(node, 1), 30, what="settled after restart")
            assert rows[0]["state"] == "forwarded"
            assert node.store.query("SELECT attempts FROM deliveries")[0]["attempts"] == 1
        finally:
            node.stop()
        assert scp.calls == 2, "an acknowledged instance was sent again"
