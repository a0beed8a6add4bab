"""Destination faults: down, association refused, failure and warning statuses per instance,
an abort mid-series, a destination that never answers, one that takes only Explicit VR Little
Endian or not every SOP class, an outage and the recovery after it. Transient failures are
retried with exponential backoff up to a cap; a refusal for good (0xA9xx, 0xCxxx, 0x0122, no
presentation context) is reported and not retried, and the rest of the series still goes. A
series that still fails after max_attempts is kept as 'failed' and `deid-node retry` sends it
again. The node runs in-process (a real SCP, a real SQLite file) against FaultySCP.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from dicomgen import make_instance, make_series, write_series
from faultpeers import FaultySCP, dicom_destination, node_raw, send_raw, write_config
from peers import Orthanc, free_port, storescu, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE

from deid_node.cli import main as cli_main
from deid_node.config import parse_config
from deid_node.forward import Outgoing, is_permanent, send_batch
from deid_node.node import Node

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

pytestmark = [pytest.mark.network]


def start(raw: dict) -> Node:
    node = Node(parse_config(raw))
    node.start()
    return node


def send_series(node: Node, tmp_path: Path, count: int) -> list:
    series = make_series(count, "CT")
    result = storescu(node.port, write_series(series, tmp_path / "in"))
    assert result.returncode == 0, result.stderr
    return series


def settled(node: Node):
    rows = node.store.query("SELECT * FROM batches")
    return rows and all(r["state"] in ("forwarded", "rejected", "failed") for r in rows) and rows


def delivery(node: Node, name: str = "research") -> dict:
    return node.store.query("SELECT * FROM deliveries WHERE destination = ?", (name,))[0]


def test_destination_down_backs_off_to_the_cap_fails_and_retry_sends(tmp_path, capsys):
    port = free_port()  # nothing listens here yet
    scp = FaultySCP(port=port)
    dest = dicom_destination(
        scp, max_attempts=4, backoff_initial_seconds=0.3, backoff_max_seconds=0.6
    )
    raw = node_raw(tmp_path / "data", [dest])
    config = write_config(tmp_path / "node.toml", raw)
    node = start(raw)
    try:
        series = send_series(node, tmp_path, 3)
        seen: dict[int, dict] = {}

        def record():
            row = delivery(node) if node.store.query("SELECT id FROM deliveries") else None
            if row and row["attempts"]:
                seen.setdefault(row["attempts"], row)
            return row and row["state"] == "failed" and row

        final = wait_until(record, 60, interval=0.01, what="delivery failed after 4 attempts")
        assert final["attempts"] == 4 and "cannot connect" in final["last_error"]
        # attempt n failed -> next try after min(cap, initial * 2**(n-1)): 0.3, 0.6, 0.6 (cap)
        for attempts, expected in ((1, 0.3), (2, 0.6), (3, 0.6)):
            row = seen[attempts]
            failed_at = datetime.fromisoformat(row["updated_at"]).timestamp()
            assert row["state"] == "pending"
            assert row["next_attempt_at"] - failed_at == pytest.approx(expected, abs=0.1)
        batch = settled(node)[0]
        assert batch["state"] == "failed"
        kept = node.store.batch_instances(batch["id"])
        assert all(Path(r["deid_path"]).exists() for r in kept), "a failed series must be kept"
        assert {r["series_state"] for r in node.store.reports(failed=True)} == {"failed"}

        assert cli_main(["status", "--config", str(config)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["batches"] == {"failed": 1}
        [row] = status["deliveries"]
        assert (row["destination"], row["state"], row["n"]) == ("research", "failed", 1)
        assert "cannot connect" in row["last_error"]

        with scp:
            uid = series[0].SeriesInstanceUID
            assert cli_main(["retry", "--config", str(config), "--series", uid]) == 0
            assert "re-queued 1" in capsys.readouterr().out
            wait_until(
                lambda: settled(node) and settled(node)[0]["state"] == "forwarded",
                30,
                what="forwarded after retry",
            )
            assert sorted(scp.stored()) == sorted(set(scp.stored())) and len(scp.stored()) == 3
        assert cli_main(["retry", "--config", str(config), "--series", uid]) == 1, (
            "nothing left to retry"
        )
    finally:
        node.stop()


def test_failed_delivery_state_is_in_the_report(tmp_path):
    dest = dicom_destination(FaultySCP(port=free_port()), max_attempts=1)
    node = start(node_raw(tmp_path / "data", [dest]))
    try:
        send_series(node, tmp_path, 2)
        wait_until(lambda: settled(node), 30, what="series failed")
        for report in node.store.reports():
            assert report["series_state"] == "failed"
            assert report["destinations"]["research"]["state"] == "failed"
    finally:
        node.stop()


def test_association_refused_wrong_called_ae(tmp_path):
    with FaultySCP() as scp:
        dest = {**dicom_destination(scp, max_attempts=2), "ae_title": "NOT_RESEARCH"}
        node = start(node_raw(tmp_path / "data", [dest]))
        try:
            send_series(node, tmp_path, 2)
            wait_until(lambda: settled(node), 30, what="series failed")
            row = delivery(node)
            assert (row["state"], row["attempts"]) == ("failed", 2)
            assert "association rejected" in row["last_error"]
            assert settled(node)[0]["state"] == "failed"
        finally:
            node.stop()
        assert scp.calls == 0


def test_failure_status_for_one_instance_is_retried_alone(tmp_path):
    with FaultySCP(status_for=lambda n, _uid: 0xA700 if n == 3 else 0x0000) as scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp, max_attempts=3)]))
        try:
            send_series(node, tmp_path, 5)
            wait_until(lambda: settled(node), 30, what="series settled")
            assert settled(node)[0]["state"] == "forwarded"
            row = delivery(node)
            assert (row["state"], row["attempts"]) == ("done", 2)
        finally:
            node.stop()
        # 2 stored, the 3rd refused, then only the 3 unsent ones again: 6 C-STOREs, 5 stored.
        assert scp.calls == 6
        assert len(scp.stored()) == len(set(scp.stored())) == 5


def test_persistent_failure_status_fails_the_series_and_keeps_what_was_sent(tmp_path):
    bad: list[str] = []

    def status_for(n: int, uid: str) -> int:
        if n == 2:
            bad.append(uid)
        return 0xA700 if uid in bad else 0x0000

    with FaultySCP(status_for=status_for) as scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp, max_attempts=2)]))
        try:
            send_series(node, tmp_path, 4)
            wait_until(lambda: settled(node), 30, what="series settled")
            assert settled(node)[0]["state"] == "failed"
            row = delivery(node)
            assert row["attempts"] == 2 and "0xA700" in row["last_error"]
            sent = node.store.query("SELECT * FROM sent")
            assert len(sent) == 3 and {s["status"] for s in sent} == {0}
            reports = node.store.reports(failed=True)
            assert len(reports) == 4 and {r["series_state"] for r in reports} == {"failed"}
            assert sum(r["url_deid"] is not None for r in reports) == 3
        finally:
            node.stop()
        assert len(set(scp.stored())) == 3 and bad[0] not in scp.stored()


def test_warning_status_counts_as_stored(tmp_path):
    with FaultySCP(status_for=lambda _n, _uid: 0xB000) as scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp)]))
        try:
            send_series(node, tmp_path, 3)
            wait_until(lambda: settled(node), 30, what="series settled")
            assert settled(node)[0]["state"] == "forwarded"
            assert delivery(node)["attempts"] == 1
            assert {s["status"] for s in node.store.query("SELECT status FROM sent")} == {0xB000}
            for report in node.store.reports():
                assert report["destinations"]["research"] == {"state": "sent", "status": 0xB000}
        finally:
            node.stop()
        assert scp.calls == 3


def test_abort_mid_series_resumes_with_the_unsent(tmp_path):
    with FaultySCP(abort_on=frozenset({3})) as scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp)]))
        try:
            send_series(node, tmp_path, 5)
            wait_until(lambda: settled(node), 30, what="series settled")
            assert settled(node)[0]["state"] == "forwarded"
            assert delivery(node)["attempts"] == 2
        finally:
            node.stop()
        assert len(scp.stored()) == len(set(scp.stored())) == 5


def test_destination_that_never_answers_times_out_and_does_not_hold_up_others(tmp_path):
    out = tmp_path / "out"
    with FaultySCP(hang=True) as scp:
        dests = [
            dicom_destination(scp, max_attempts=2, timeout_seconds=1),
            {"name": "folder", "type": "folder", "path": str(out)},
        ]
        node = start(node_raw(tmp_path / "data", dests))
        try:
            send_series(node, tmp_path, 3)
            # The folder destination has its own queue: done while the other one hangs.
            wait_until(
                lambda: (
                    delivery(node, "folder")["state"] == "done"
                    if node.store.query("SELECT id FROM deliveries")
                    else False
                ),
                30,
                what="folder delivery done",
            )
            assert len(list(out.rglob("*.dcm"))) == 3
            wait_until(lambda: settled(node), 60, what="series settled")
            row = delivery(node)
            assert (row["state"], row["attempts"]) == ("failed", 2)
            assert "no response" in row["last_error"]
            assert settled(node)[0]["state"] == "failed"
        finally:
            node.stop()


# -- per-instance outcomes: decompression, refusals for good, recovery after an outage ----------


def mixed_syntax_series(folder: Path) -> tuple[list[Path], dict[int, np.ndarray]]:
    """One series in three syntaxes: Explicit VR LE (CT), JPEG 2000 lossless (CT, encoded here)
    and JPEG Baseline (pydicom's SC_rgb_jpeg_dcmtk.dcm moved into the series). Returns the
    files and, by InstanceNumber, the pixels each must decode to."""
    study_uid, series_uid = generate_uid(), generate_uid()
    plain = make_instance("CT", study_uid=study_uid, series_uid=series_uid, instance_number=1)
    j2k = make_instance("CT", study_uid=study_uid, series_uid=series_uid, instance_number=2)
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    jpeg = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID = study_uid, series_uid
    jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    jpeg.InstanceNumber = 3
    expected = {1: plain.pixel_array, 2: j2k.pixel_array, 3: jpeg.pixel_array}
    return write_series([plain, j2k, jpeg], folder), expected


def test_mixed_syntax_series_arrives_decompressed_at_an_explicit_vr_only_destination(tmp_path):
    scp = FaultySCP(transfer_syntaxes=[ExplicitVRLittleEndian], keep_datasets=True)
    with scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp, max_attempts=3)]))
        try:
            paths, expected = mixed_syntax_series(tmp_path / "in")
            assert send_raw(node.port, paths) == [0, 0, 0]
            wait_until(lambda: settled(node), 30, what="series settled")
            assert settled(node)[0]["state"] == "forwarded"
            assert delivery(node)["attempts"] == 1
            deid_uids = {r["sop_uid_deid"] for r in node.store.query("SELECT * FROM instances")}
        finally:
            node.stop()
    assert len(scp.received) == 3 and {r.status for r in scp.received} == {0}
    assert {r.transfer_syntax for r in scp.received} == {ExplicitVRLittleEndian}
    for r in scp.received:
        ds = r.dataset
        assert "PixelData" in ds and str(ds.SOPInstanceUID) == r.sop_uid
        # The de-identified UID is kept (pydicom's decompress would make a new one by default).
        assert r.sop_uid in deid_uids
        assert np.array_equal(ds.pixel_array, expected[int(ds.InstanceNumber)])


def test_mixed_syntax_series_arrives_decompressed_at_an_orthanc_taking_explicit_vr_only(tmp_path):
    orthanc = Orthanc(
        tmp_path / "orthanc", extra_config={"AcceptedTransferSyntaxes": [ExplicitVRLittleEndian]}
    ).start()
    node = None
    try:
        # The restriction is real: Orthanc refuses a JPEG Baseline context.
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(SECONDARY_CAPTURE, [JPEGBaseline8Bit])
        ae.add_requested_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        assert assoc.is_established
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        assoc.release()
        assert accepted == {ExplicitVRLittleEndian}
        dest = {
            "name": "research",
            "type": "dicom",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "max_attempts": 2,
            "backoff_initial_seconds": 0.2,
        }
        node = start(node_raw(tmp_path / "data", [dest]))
        paths, expected = mixed_syntax_series(tmp_path / "in")
        assert send_raw(node.port, paths) == [0, 0, 0]
        wait_until(lambda: settled(node), 30, what="series settled")
        assert settled(node)[0]["state"] == "forwarded"
        assert delivery(node)["attempts"] == 1
        stored = [dcmread(BytesIO(orthanc.instance_file(i))) for i in orthanc.instances()]
        assert len(stored) == 3
        for ds in stored:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, expected[int(ds.InstanceNumber)])
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_sop_class_the_destination_does_not_take_is_refused_for_good_and_the_rest_arrives(
    tmp_path,
):
    with FaultySCP(sop_classes=frozenset({CT_IMAGE_STORAGE})) as scp:
        node = start(node_raw(tmp_path / "data", [dicom_destination(scp, max_attempts=3)]))
        try:
            series = make_series(3, "CT")
            series.append(
                make_instance(
                    "OT",  # Secondary Capture: the destination takes CT only
                    study_uid=series[0].StudyInstanceUID,
                    series_uid=series[0].SeriesInstanceUID,
                    instance_number=4,
                )
            )
            assert send_raw(node.port, write_series(series, tmp_path / "in")) == [0] * 4
            wait_until(lambda: settled(node), 30, what="series settled")
            row = delivery(node)
            # Not retried: no attempt can create a presentation context the peer refuses.
            assert (row["state"], row["attempts"]) == ("failed", 1)
            assert "refused for good" in row["last_error"]
            assert "no accepted presentation context for Secondary Capture" in row["last_error"]
            assert settled(node)[0]["state"] == "failed"
            states = sorted(r["destinations"]["research"]["state"] for r in node.store.reports())
            assert states == ["refused", "sent", "sent", "sent"]
        finally:
            node.stop()
    assert len(scp.stored()) == len(set(scp.stored())) == 3


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(0xA900, True), (0xA9FF, True), (0xC000, True), (0xCFFF, True), (0x0122, True)]
    + [(0xA700, False), (0xA7FF, False), (0x0110, False), (0x0001, False)],
)
def test_failure_statuses_are_sorted_into_permanent_and_transient(status, permanent):
    assert is_permanent(status) is permanent


def test_permanent_failure_status_is_not_retried_and_the_others_arrive(tmp_path, capsys):
    with FaultySCP(status_for=lambda n, _uid: 0xA900 if n == 2 else 0x0000) as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp, max_attempts=3)])
        config = write_config(tmp_path / "node.toml", raw)
        node = start(raw)
        try:
            series = send_series(node, tmp_path, 4)
            wait_until(lambda: settled(node), 30, what="series settled")
            row = delivery(node)
            assert (row["state"], row["attempts"]) == ("failed", 1)
            assert "0xA900" in row["last_error"]
            assert settled(node)[0]["state"] == "failed"
            refused = [
                r["destinations"]["research"]
                for r in node.store.reports()
                if r["destinations"]["research"]["state"] == "refused"
            ]
            assert [r["status"] for r in refused] == [0xA900]
            assert scp.calls == 4, "the refused instance was offered once"
            assert len(scp.stored()) == len(set(scp.stored())) == 3

            # The operator fixed the cause: `retry` offers the refused instance again, only it.
            uid = series[0].SeriesInstanceUID
            assert cli_main(["retry", "--config", str(config), "--series", uid]) == 0
            capsys.readouterr()
            wait_until(
                lambda: settled(node) and settled(node)[0]["state"] == "forwarded",
                30,
                what="forwarded after retry",
            )
        finally:
            node.stop()
    assert scp.calls == 5
    assert len(scp.stored()) == len(set(scp.stored())) == 4


def test_delivery_resumes_within_seconds_of_the_destination_coming_back(tmp_path):
    scp = FaultySCP()  # down: its port is free until start()
    # Attempts fail at t, t + 8 s (backoff 8 s), and the next one is due at t + 24 s; the SCP
    # comes back just after the second failure, so without the C-ECHO probe delivery would
    # wait about 15 s more.
    dest = dicom_destination(scp, max_attempts=5, backoff_initial_seconds=8, backoff_max_seconds=60)
    node = start(node_raw(tmp_path / "data", [dest]))
    try:
        send_series(node, tmp_path, 3)
        send_series(node, tmp_path, 2)  # a second series waits for the same destination
        waiting = wait_until(
            lambda: [
                d
                for d in node.store.query("SELECT * FROM deliveries WHERE attempts >= 2")
                if len(node.store.query("SELECT id FROM deliveries")) == 2
            ][1:],
            40,
            interval=0.05,
            what="second attempt of both series failed",
        )
        assert "cannot connect" in waiting[0]["last_error"]
        time.sleep(0.5)
        with scp:
            back = time.monotonic()
            rows = node.store.query("SELECT * FROM deliveries")
            assert min(r["next_attempt_at"] for r in rows) - time.time() > 12, "backoff: later"
            wait_until(lambda: len(scp.stored()) == 5, 15, interval=0.05, what="delivered")
            resumed_after = time.monotonic() - back
            print(f"delivery resumed {resumed_after:.2f} s after the destination came back")
            assert resumed_after < 10
            wait_until(
                lambda: [b for b in settled(node) or [] if b["state"] == "forwarded"][1:],
                10,
                what="both series forwarded",
            )
        rows = node.store.query("SELECT * FROM deliveries")
        assert [(r["state"], r["attempts"]) for r in rows] == [("done", 3), ("done", 3)]
    finally:
        node.stop()
    assert len(set(scp.stored())) == 5


def test_instance_that_cannot_be_decompressed_is_refused_for_good_and_the_rest_arrives(tmp_path):
    """send_batch on its own: one JPEG 2000 instance over the decoded-size bound, one whose
    codestream is cut, one Explicit VR LE and one deflated without pixel data (re-encoded);
    the destination takes only Explicit VR LE."""
    paths, _ = mixed_syntax_series(tmp_path / "in")
    plain, j2k, _jpeg = (dcmread(p) for p in paths)
    big = make_instance("CT", rows=256, columns=256, instance_number=4)
    big.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")  # 128 KiB decoded
    cut = j2k
    cut.SOPInstanceUID = cut.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    frame = cut.PixelData
    cut.PixelData = frame[: len(frame) // 3] + b"\0" * (len(frame) % 2)
    deflated = make_instance("CT", instance_number=5)
    del deflated.PixelData
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    files = write_series([plain, big, cut, deflated], tmp_path / "out")
    items = [
        Outgoing(n, path, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), "st", "se")
        for n, path in enumerate(files)
    ]
    stored: list[str] = []
    refused: list[tuple[str, int | None, str]] = []
    with FaultySCP(transfer_syntaxes=[ExplicitVRLittleEndian]) as scp:
        dest = parse_config(node_raw(tmp_path / "data", [dicom_destination(scp)])).destinations[0]
        send_batch(
            dest,
            items,
            lambda item, _url, _status: stored.append(item.sop_uid),
            lambda item, status, reason: refused.append((item.sop_uid, status, reason)),
            max_decoded_bytes=64 * 1024,
        )
    assert stored == [items[0].sop_uid, items[3].sop_uid] == scp.stored()
    assert [(uid, status) for uid, status, _ in refused] == [
        (items[1].sop_uid, None),
        (items[2].sop_uid, None),
    ]
    assert "would be 0.1 MiB decompressed, over the 0.1 MiB limit" in refused[0][2]
    assert "cannot decompress JPEG 2000" in refused[1][2]
