"""The C-STORE SCP: Success only once on disk and committed; the right failure status otherwise.

Peers: DCMTK echoscu/storescu and pynetdicom as a client, against the real SCP on loopback.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from dicomgen import make_instance, write_series
from peers import echoscu, free_port, storescu
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from deid_node.config import NodeConfig
from deid_node.scp import StoreLimits, enable_chunked_receive, start_server
from deid_node.store import Store

BIG = 1 << 40


@pytest.fixture(params=["chunked", "in-memory"])
def scp(request, tmp_path):
    """Start the SCP in-process; returns a function (allowed AEs, limits) -> (port, store).

    Runs each test with pynetdicom streaming datasets to a file (what the node does) and with
    the dataset held in memory (pynetdicom's default)."""
    servers = []
    if request.param == "chunked":
        enable_chunked_receive(tmp_path / "data" / "tmp")

    def start(allowed=(), limits=None):
        limits = limits or StoreLimits(BIG, 0)
        port = free_port()
        node = NodeConfig(
            host="127.0.0.1",
            port=port,
            data_dir=tmp_path / "data",
            allowed_calling_aets=tuple(allowed),
            min_free_disk_mb=0,  # the handlers' limits are the ones under test here
        )
        store = Store(node.data_dir)
        servers.append((start_server(node, store, limits), store))
        return port, store

    yield start
    for server, store in servers:
        server.stop(5)
        store.close()
    _config.STORE_RECV_CHUNKED_DATASET = False
    _config.STORE_SEND_CHUNKED_DATASET = False
    tempfile.tempdir = None


def send_files(port: int, paths: list[Path], calling: str = "PYSCU") -> list[int]:
    """Send files as they are on disk: chunked mode sends the raw bytes without decoding them,
    taking the request's UIDs from the file meta (that is how a broken sender behaves)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _send(port, paths, calling)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _send(port: int, paths: list[Path], calling: str) -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def refused(store: Store) -> list[tuple[int, bool]]:
    """(status, kept in quarantine) of every refused instance."""
    rows = store.query("SELECT status, quarantine_path FROM refused ORDER BY id")
    return [
        (
            r["status"],
            bool(r["quarantine_path"]) and (store.data_dir / r["quarantine_path"]).exists(),
        )
        for r in rows
    ]


def test_echo_and_store_with_dcmtk(scp, tmp_path):
    port, store = scp()
    assert echoscu(port).returncode == 0
    paths = write_series([make_instance("CT") for _ in range(3)], tmp_path / "in")
    result = storescu(port, paths)
    assert result.returncode == 0, result.stderr
    rows = store.query("SELECT * FROM instances ORDER BY id")
    assert len(rows) == 3
    for row, path in zip(rows, paths, strict=True):
        spooled = (store.data_dir / row["spool_path"]).read_bytes()  # relative to data_dir
        original = dcmread(path)
        received = dcmread(io.BytesIO(spooled))
        # Stored as sent: the dataset bytes are identical (file meta is rebuilt by the SCP).
        assert received.SOPInstanceUID == original.SOPInstanceUID
        assert received.PixelData == original.PixelData
        assert received.PatientName == original.PatientName
        assert row["calling_ae"] == "MODALITY"
        assert row["url"] == f"dicom://MODALITY/{original.SOPInstanceUID}"


def test_calling_ae_outside_allowed_list_is_refused(scp):
    port, _ = scp(allowed=["CT_ROOM1"])
    assert echoscu(port, calling="CT_ROOM1").returncode == 0
    refused = echoscu(port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr


def test_wrong_called_ae_is_refused(scp):
    port, _ = scp()
    refused = echoscu(port, called="SOMEONE_ELSE")
    assert refused.returncode != 0


def test_no_free_disk_answers_out_of_resources(scp, tmp_path):
    port, store = scp(limits=StoreLimits(BIG, BIG))
    paths = write_series([make_instance("CT")], tmp_path / "in")
    assert send_files(port, paths) == [0xA700]
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0


def test_oversized_instance_answers_out_of_resources(scp, tmp_path):
    port, store = scp(limits=StoreLimits(1024, 0))
    paths = write_series([make_instance("CT")], tmp_path / "in")
    assert send_files(port, paths) == [0xA700]
    assert not list((store.data_dir / "spool").rglob("*.dcm"))
    assert refused(store) == [(0xA700, False)]
    assert not list((store.data_dir / "tmp").iterdir())


def test_missing_series_uid_cannot_understand(scp, tmp_path):
    port, store = scp()
    ds = make_instance("CT")
    del ds.SeriesInstanceUID
    path = tmp_path / "noseries.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert send_files(port, [path]) == [0xC000]
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert refused(store) == [(0xC000, True)]
    report = store.reports(failed=True)[0]
    assert report["error"] == "missing SeriesInstanceUID" and report["dimse_status"] == "0xC000"
    assert report["url"] == f"dicom://PYSCU/{ds.SOPInstanceUID}" and report["url_deid"] is None


def test_garbage_dataset_cannot_understand(scp, tmp_path):
    port, store = scp()
    ds = make_instance("CT")
    path = tmp_path / "garbage.dcm"
    ds.save_as(path, enforce_file_format=True)
    # Keep the file meta (the request's UIDs come from it), replace the dataset with junk.
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    path.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f" + b"\x01" * 40)
    assert send_files(port, [path]) == [0xC000]
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert refused(store) == [(0xC000, True)]


def test_uid_mismatch_with_request_is_dataset_mismatch(scp, tmp_path):
    port, store = scp()
    ds = make_instance("CT", sop_uid="1.2.3.4.5.6.7")
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=True)
    # The file meta (hence the request) keeps 1.2.3.4.5.6.7; the dataset says 1.2.3.4.5.6.8.
    raw = path.read_bytes()
    first = raw.index(b"1.2.3.4.5.6.7")
    second = raw.index(b"1.2.3.4.5.6.7", first + 1)
    path.write_bytes(raw[:second] + b"1.2.3.4.5.6.8" + raw[second + 13 :])
    assert send_files(port, [path]) == [0xA900]
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert refused(store) == [(0xA900, True)]


def test_database_failure_is_never_success(scp, tmp_path):
    port, store = scp()
    store.engine._conn.execute("PRAGMA query_only = ON")  # every write now fails inside SQLite
    paths = write_series([make_instance("CT")], tmp_path / "in")
    status = send_files(port, paths)
    assert status[0] != 0x0000 and status[0] in (0xA700, 0x0110)
    store.engine._conn.execute("PRAGMA query_only = OFF")
    assert not list((store.data_dir / "spool").rglob("*.dcm")), (
        "spool file of a refused instance remains"
    )


def test_resent_instance_is_idempotent(scp, tmp_path):
    port, store = scp()
    paths = write_series([make_instance("CT")], tmp_path / "in")
    assert send_files(port, paths + paths) == [0, 0]
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert len(list((store.data_dir / "spool").rglob("*.dcm"))) == 1


def test_verification_with_pynetdicom(scp):
    port, _ = scp()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_NODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
