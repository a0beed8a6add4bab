"""Access and data at rest: calling/called AE checks, per-AE source networks, TLS both ways,
owner-only files, originals deleted after their series left, no PHI in logs, reports, errors.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
from dicomgen import PHI, make_instance, make_series, phi_markers, write_series
from faultpeers import (
    FaultySCP,
    KillableNode,
    associate,
    db_rows,
    dicom_destination,
    node_raw,
    send_raw,
    write_config,
)
from peers import echoscu, require, storescu, wait_until
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from rawdicom import closed_by_peer

from deid_node.config import parse_config
from deid_node.node import Node

pytestmark = [pytest.mark.network]

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def collect_refused_sockets():
    """pynetdicom (the client side, in this process) leaves the socket of a rejected or failed
    association to the garbage collector; collect them in the test that made them."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def start(raw: dict) -> Node:
    node = Node(parse_config(raw))
    node.start()
    return node


def settled(node: Node, count: int):
    rows = node.store.query("SELECT * FROM batches")
    final = [r for r in rows if r["state"] in ("forwarded", "rejected", "failed")]
    return len(final) == count and rows


def folder(tmp_path: Path) -> dict:
    return {"name": "out", "type": "folder", "path": str(tmp_path / "out")}


# -- who may connect ----------------------------------------------------------------------------


def test_calling_ae_not_allowed_and_wrong_called_ae_are_refused(tmp_path):
    node = start(node_raw(tmp_path / "data", [folder(tmp_path)], allowed_calling_aets=["MODALITY"]))
    try:
        intruder = associate(node.port, calling="INTRUDER")
        assert intruder.is_rejected
        wrong_called = associate(node.port, called="OTHER_NODE")
        assert wrong_called.is_rejected
        allowed = associate(node.port)
        assert allowed.is_established
        allowed.release()
        # Nothing of the refused peers reached the database.
        assert not node.store.query("SELECT id FROM instances")
    finally:
        node.stop()


def test_allowed_peers_restricts_an_ae_to_its_networks(tmp_path):
    peers = {"MODALITY": ["10.0.0.0/8"], "LOCAL_CT": ["127.0.0.0/8"]}
    node = start(node_raw(tmp_path / "data", [folder(tmp_path)], allowed_peers=peers))
    try:
        assert associate(node.port, calling="MODALITY").is_rejected  # 127.0.0.1 not in 10/8
        for calling in ("LOCAL_CT", "UNLISTED"):  # listed and in range; unlisted: no IP rule
            assoc = associate(node.port, calling=calling)
            assert assoc.is_established, calling
            assoc.release()
    finally:
        node.stop()


# -- TLS ----------------------------------------------------------------------------------------


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a rogue CA's
    client certificate, all made with the openssl CLI."""
    openssl = require("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "rogue"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN=test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue_client", "rogue")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


def client_context(pki: dict[str, Path], who: str | None = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
    if who:
        context.load_cert_chain(pki[f"{who}_pem"], pki[f"{who}_key"])
    return context


def test_tls_scp_requires_a_client_certificate_from_the_ca(tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki["server_pem"]), "key": str(pki["server_key"]), "ca": str(pki["ca_pem"])}
    node = start(node_raw(tmp_path / "data", [folder(tmp_path)], tls=tls))
    try:
        good = associate(node.port, tls=client_context(pki))
        assert good.is_established
        ds = make_instance("CT")
        assert good.send_c_store(ds).Status == 0x0000
        good.release()
        assert node.store.query("SELECT id FROM instances WHERE sop_uid = ?", (ds.SOPInstanceUID,))
        with warnings.catch_warnings():
            # pynetdicom's client drops the socket of a failed TLS connect unclosed when the
            # node already reset it (AssociationSocket._shutdown_socket): a client-side leak.
            warnings.simplefilter("ignore", ResourceWarning)
            assert not associate(node.port).is_established, "plain TCP accepted by a TLS node"
            assert not associate(node.port, tls=client_context(pki, None)).is_established
            rogue = associate(node.port, tls=client_context(pki, "rogue_client"))
            assert not rogue.is_established, "a client certificate from another CA was accepted"
            del rogue
            gc.collect()
    finally:
        node.stop()


def test_idle_tls_connections_do_not_block_a_tls_association(tmp_path):
    """pynetdicom did the handshake on its accept thread, with no timeout: one idle connection
    stopped every other. Now each handshake runs in its connection's own thread, bounded by
    association_request_timeout_seconds."""
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki["server_pem"]), "key": str(pki["server_key"]), "ca": str(pki["ca_pem"])}
    raw = node_raw(
        tmp_path / "data", [folder(tmp_path)], tls=tls, association_request_timeout_seconds=2
    )
    node = start(raw)
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(3)]
    try:
        idle[1].sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assoc = associate(node.port, tls=client_context(pki), timeout=5)
        assert assoc.is_established, "an idle TLS connection blocked the next peer"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        for sock in idle:  # closed by the node once association_request_timeout_seconds passed
            assert closed_by_peer(sock, timeout=10)
    finally:
        for sock in idle:
            sock.close()
        node.stop()


def test_tls_scu_forwards_to_a_tls_destination(tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca_pem"]))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(pki["server_pem"], pki["server_key"])
    with FaultySCP(ssl_context=server) as scp:
        dest = dicom_destination(
            scp,
            tls_ca=str(pki["ca_pem"]),
            tls_cert=str(pki["client_pem"]),
            tls_key=str(pki["client_key"]),
        )
        node = start(node_raw(tmp_path / "data", [dest]))
        try:
            assert (
                storescu(node.port, write_series(make_series(2), tmp_path / "in")).returncode == 0
            )
            rows = wait_until(lambda: settled(node, 1), 30, what="series settled")
            assert rows[0]["state"] == "forwarded"
        finally:
            node.stop()
        assert len(set(scp.stored())) == 2


# -- idle connections against the node process ----------------------------------------------------


def test_idle_sockets_take_no_slot_and_sigterm_exits_promptly(tmp_path):
    """40 connections that send nothing: DCMTK echoscu and storescu still succeed (they failed
    with "Local Limit Exceeded"), and SIGTERM with 30 of them open ends the node at once (it
    hung). The default association_request_timeout_seconds (10 s) is not reached here."""
    raw = node_raw(tmp_path / "data", [folder(tmp_path)], network_timeout_seconds=60)
    config = write_config(tmp_path / "node.toml", raw)
    node = KillableNode(config, raw["node"]["port"], tmp_path / "node.log").start()
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(40)]
    try:
        echo = echoscu(node.port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        sent = storescu(node.port, write_series(make_series(2), tmp_path / "in"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        for sock in idle[30:]:
            sock.close()
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        try:
            code = node.proc.wait(timeout=15)  # bounded; it used to hang
        except subprocess.TimeoutExpired:
            node.kill9()
            pytest.fail("SIGTERM with 30 idle sockets open did not stop the node in 15 s")
        assert code == 0
        node.log.close()
    finally:
        for sock in idle:
            sock.close()
    assert b"node_stopped" in (tmp_path / "node.log").read_bytes()
    assert b"Traceback" not in (tmp_path / "node.log").read_bytes()


# -- data at rest -------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spool_database_and_secret_are_owner_only(tmp_path):
    data = tmp_path / "data"
    node = start(node_raw(data, [folder(tmp_path)]))
    try:
        assert storescu(node.port, write_series(make_series(2), tmp_path / "in")).returncode == 0
        bad = make_instance("CT")
        del bad.SeriesInstanceUID  # refused and quarantined
        bad_path = tmp_path / "bad.dcm"
        bad.save_as(bad_path, enforce_file_format=True)
        assert send_raw(node.port, [bad_path]) == [0xC000]
        wait_until(lambda: settled(node, 1), 30, what="series forwarded")
        for sub in ("", "spool", "quarantine", "tmp", "deid"):
            assert mode(data / sub) == 0o700, f"{sub or 'data_dir'} is {oct(mode(data / sub))}"
        for name in (
            "deid-node.sqlite",
            "deid-node.sqlite-wal",
            "deid-node.sqlite-shm",
            "secret.key",
        ):
            assert mode(data / name) == 0o600, f"{name} is {oct(mode(data / name))}"
        quarantined = list((data / "quarantine").iterdir())
        assert quarantined and all(mode(p) == 0o600 for p in quarantined)
    finally:
        node.stop()


def test_every_file_and_folder_under_data_dir_is_owner_only(tmp_path):
    data = tmp_path / "data"
    raw = node_raw(data, [folder(tmp_path)], retention_hours=1)  # keep files to inspect them
    node = start(raw)
    try:
        assert storescu(node.port, write_series(make_series(2), tmp_path / "in")).returncode == 0
        wait_until(lambda: settled(node, 1), 30, what="series forwarded")
        loose = [
            f"{p.relative_to(data)} {oct(mode(p))}"
            for p in [data, *data.rglob("*")]
            if mode(p) & 0o077
        ]
        assert not loose, f"readable by others: {loose}"
    finally:
        node.stop()


def test_originals_are_deleted_once_forwarded_or_rejected(tmp_path):
    data = tmp_path / "data"
    node = start(node_raw(data, [folder(tmp_path)], retention_hours=0))
    try:
        passing = make_series(2, "CT")
        rejected = make_series(2, "CT", image_type="ORIGINAL\\PRIMARY\\AXIAL")
        files = write_series(passing, tmp_path / "a") + write_series(rejected, tmp_path / "b")
        assert storescu(node.port, files).returncode == 0
        rows = wait_until(lambda: settled(node, 2), 30, what="both series settled")
        assert sorted(r["state"] for r in rows) == ["forwarded", "rejected"]
        # Originals and de-identified copies are deleted one after the other, and each file's
        # path is cleared in the database after its deletion: wait for all of it.
        wait_until(
            lambda: (
                not list((data / "spool").rglob("*.dcm"))
                and not list((data / "deid").rglob("*.dcm"))
                and not node.store.query("SELECT id FROM instances WHERE spool_path IS NOT NULL")
            ),
            10,
            what="originals and de-identified copies deleted and forgotten",
        )
        assert not list((data / "tmp").iterdir()), "received files left in tmp/"
        assert not node.store.query("SELECT id FROM instances WHERE spool_path IS NOT NULL")
    finally:
        node.stop()


# -- no identity in logs, reports, errors -------------------------------------------------------


def garbage_jpeg(path: Path) -> Path:
    """A JPEG Baseline instance whose single fragment is not a JPEG stream."""
    ds = make_instance("CT")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + b"not a jpeg " * 50 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_planted_phi_in_logs_reports_or_errors(tmp_path):
    markers = phi_markers() + [v.encode() for v in PHI.values()]
    with FaultySCP(status_for=lambda n, _uid: 0xA700 if n == 1 else 0x0000) as scp:
        raw = node_raw(tmp_path / "data", [dicom_destination(scp)], mode="REDACT_ALL_TEXT")
        config = write_config(tmp_path / "node.toml", raw)
        log_path = tmp_path / "node.log"
        node = KillableNode(config, raw["node"]["port"], log_path, log_level="debug").start()
        try:
            passing = make_series(2, "CT")
            rejected = make_series(1, "CT", image_type="ORIGINAL\\PRIMARY")
            mismatch = make_instance("CT")
            mismatch.Rows = mismatch.Columns = 512  # refused by the SCP: pixel data too short
            no_series = make_instance("CT")
            del no_series.SeriesInstanceUID  # refused by the SCP
            files = write_series(passing + rejected + [mismatch, no_series], tmp_path / "in")
            sent = storescu(node.port, files)
            assert "0xc000" in (sent.stdout + sent.stderr).lower() or sent.returncode != 0
            # Accepted, then quarantined by the pipeline with a decoder's exception message.
            assert send_raw(node.port, [garbage_jpeg(tmp_path / "garbage.dcm")]) == [0x0000]
            db = tmp_path / "data" / "deid-node.sqlite"
            wait_until(
                lambda: (
                    len(
                        db_rows(
                            db,
                            "SELECT id FROM batches WHERE state IN ('forwarded','rejected','failed')",
                        )
                    )
                    == 3
                ),
                90,
                what="three series settled",
            )
        finally:
            assert node.stop() == 0
    logged = log_path.read_bytes()
    assert b"forward_failed" in logged and b"store_refused" in logged
    leaked = [m for m in markers if m in logged]
    assert not leaked, f"identifying values in the node's log: {leaked}"

    reports = [json.loads(r["report"]) for r in db_rows(db, "SELECT report FROM instances")]
    errors = [
        r["error"] for r in db_rows(db, "SELECT error FROM instances WHERE error IS NOT NULL")
    ]
    errors += [r["reason"] for r in db_rows(db, "SELECT reason FROM refused")]
    errors += [r["last_error"] for r in db_rows(db, "SELECT last_error FROM deliveries")]
    assert any("pixel data" in e for e in errors if e)
    text = json.dumps([reports, errors, db_rows(db, "SELECT summary FROM batches")]).encode()
    leaked = [m for m in markers if m in text]
    assert not leaked, f"identifying values in reports or errors: {leaked}"
    for name in os.listdir(tmp_path / "data"):  # the database files as a whole
        if name.startswith("deid-node.sqlite"):
            blob = (tmp_path / "data" / name).read_bytes()
            assert not [m for m in markers if m in blob], f"identifying values in {name}"
