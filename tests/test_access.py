"""Access control: per-AE source networks, and TLS on both the SCP and the SCU side."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from dicomgen import make_series, write_series
from peers import echoscu, free_port, wait_until
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_node.config import parse_config
from deid_node.node import Node

pytestmark = [pytest.mark.network]


def start_node(tmp_path: Path, node_extra: dict, destinations: list[dict] | None = None) -> Node:
    raw = {
        "node": {
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(tmp_path / "data"),
            "min_free_disk_mb": 1,
            "poll_seconds": 0.2,
            **node_extra,
        },
        "series": {"stable_seconds": 0.5},
        "deid": {"redact_pixels_mode": "REDACT_NO_TEXT"},
        "destinations": destinations
        or [{"name": "out", "type": "folder", "path": str(tmp_path / "out")}],
    }
    node = Node(parse_config(raw))
    node.start()
    return node


def test_ae_restricted_to_networks(tmp_path):
    node = start_node(
        tmp_path, {"allowed_peers": {"CT_ROOM1": ["10.0.0.0/8"], "US_ER": ["127.0.0.0/8"]}}
    )
    try:
        assert echoscu(node.port, calling="US_ER").returncode == 0  # listed, from its network
        assert echoscu(node.port, calling="CT_ROOM1").returncode != 0  # listed, wrong network
        assert echoscu(node.port, calling="OTHER").returncode == 0  # not listed: any address
    finally:
        node.stop()


def test_allowed_aets_and_networks_combine(tmp_path):
    node = start_node(
        tmp_path, {"allowed_calling_aets": ["US_ER"], "allowed_peers": {"US_ER": ["127.0.0.1/32"]}}
    )
    try:
        assert echoscu(node.port, calling="US_ER").returncode == 0
        assert echoscu(node.port, calling="OTHER").returncode != 0
    finally:
        node.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    folder = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=deid-node test CA",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def client_context(pki, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    if with_cert:
        context.load_cert_chain(pki["client.pem"], pki["client.key"])
    return context


def echo_tls(port: int, context: ssl.SSLContext) -> bool:
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = (context, "127.0.0.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_NODE", tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def tls_session_refused(port: int, context: ssl.SSLContext) -> bool:
    """Open a TLS session without a client certificate: the server must end it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x01\x00")  # the start of an A-ASSOCIATE-RQ
                return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            return True


def test_scp_requires_tls_with_a_client_certificate(tmp_path, pki):
    tls = {"cert": str(pki["server.pem"]), "key": str(pki["server.key"]), "ca": str(pki["ca.pem"])}
    node = start_node(tmp_path, {"tls": tls})
    try:
        assert echo_tls(node.port, client_context(pki, with_cert=True))
        assert tls_session_refused(node.port, client_context(pki, with_cert=False))
        assert echoscu(node.port).returncode != 0  # plain TCP (DCMTK)
    finally:
        node.stop()


def test_forwarding_over_tls_to_a_tls_node(tmp_path, pki):
    """Two nodes: the first forwards by C-STORE over mutual TLS to the second (a TLS SCP)."""
    tls = {"cert": str(pki["server.pem"]), "key": str(pki["server.key"]), "ca": str(pki["ca.pem"])}
    receiver = start_node(tmp_path / "receiver", {"tls": tls, "ae_title": "RESEARCH"})
    dest = {
        "name": "research",
        "type": "dicom",
        "ae_title": "RESEARCH",
        "host": "127.0.0.1",
        "port": receiver.port,
        "tls_ca": str(pki["ca.pem"]),
        "tls_cert": str(pki["client.pem"]),
        "tls_key": str(pki["client.key"]),
        "timeout_seconds": 5,
    }
    sender = start_node(tmp_path / "sender", {}, [dest])
    try:
        from peers import storescu

        paths = write_series(make_series(2, "CT"), tmp_path / "in")
        assert storescu(sender.port, paths).returncode == 0
        wait_until(
            lambda: sender.store.query("SELECT 1 FROM batches WHERE state = 'forwarded'"),
            60,
            what="forwarded over TLS",
        )
        assert receiver.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
        assert {
            r["calling_ae"] for r in receiver.store.query("SELECT calling_ae FROM instances")
        } == {"DEID_NODE"}
    finally:
        sender.stop()
        receiver.stop()
