"""DICOMweb STOW-RS destination: a real Orthanc with its DICOMweb plugin (Debian package
orthanc-dicomweb) and HTTP basic authentication. The node runs in-process (a real SCP, a real
SQLite file); instances are counted through Orthanc's REST API. Skipped when the plugin is not
installed (`make system-deps` installs it).
"""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from dicomgen import make_series, write_series
from faultpeers import node_raw, write_config
from peers import Orthanc, require, storescu, wait_until
from pydicom import dcmread
from test_access import pki  # noqa: F401 (a fixture: a CA and a certificate for 127.0.0.1)

from deid_node.cli import main as cli_main
from deid_node.config import parse_config
from deid_node.errors import ConfigError, DestinationUnreachableError, ForwardError
from deid_node.forward import Outgoing, echo, send_batch
from deid_node.node import Node

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD_ENV, PASSWORD = "alice", "DEID_TEST_DICOMWEB_PASSWORD", "s3cret-for-tests"

pytestmark = [pytest.mark.network]


def web_orthanc(workdir: Path) -> Orthanc:
    """Not started: a test starts it (Orthanc's ports are chosen now)."""
    require("Orthanc")
    if not PLUGIN.is_file():
        pytest.skip("orthanc-dicomweb is not installed")
    return Orthanc(
        workdir,
        extra_config={
            "Plugins": [str(PLUGIN)],
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    )


def count(orthanc: Orthanc) -> int:
    url = f"http://127.0.0.1:{orthanc.http_port}/statistics"
    return int(httpx.get(url, auth=(USER, PASSWORD), timeout=10).json()["CountInstances"])


def web_destination(orthanc: Orthanc, **extra) -> dict:
    return {
        "name": "research-web",
        "type": "dicomweb",
        "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
        "auth": "basic",
        "username": USER,
        "password_env": PASSWORD_ENV,
        "instances_per_request": 2,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1,
        "timeout_seconds": 5,
        **extra,
    }


def start(raw: dict) -> Node:
    node = Node(parse_config(raw))
    node.start()
    return node


def deliveries(node: Node) -> list[dict]:
    return node.store.query("SELECT * FROM deliveries")


def settled(node: Node):
    rows = node.store.query("SELECT * FROM batches")
    return rows and all(r["state"] in ("forwarded", "rejected", "failed") for r in rows) and rows


def test_series_is_forwarded_by_stow_rs_with_basic_auth(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    orthanc = web_orthanc(tmp_path / "orthanc").start()
    node = None
    try:
        node = start(node_raw(tmp_path / "data", [web_destination(orthanc)]))
        files = write_series(make_series(5, "CT"), tmp_path / "in")
        assert storescu(node.port, files).returncode == 0
        rows = wait_until(lambda: settled(node), 30, what="series settled")
        assert [r["state"] for r in rows] == ["forwarded"]
        assert count(orthanc) == 5  # three requests of at most 2 instances
        assert [(d["state"], d["attempts"]) for d in deliveries(node)] == [("done", 1)]
        sent = node.store.query("SELECT url_deid, status FROM sent")
        base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies/"
        assert len(sent) == 5 and all(r["url_deid"].startswith(base) for r in sent)
        # The URL is the instance's WADO-RS address: Orthanc serves it.
        got = httpx.get(
            sent[0]["url_deid"], auth=(USER, PASSWORD), timeout=10, headers={"Accept": "*/*"}
        )
        assert got.status_code == 200
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_wrong_password_is_retried_never_refused_for_good(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    orthanc = web_orthanc(tmp_path / "orthanc").start()
    node = None
    try:
        dest = web_destination(orthanc, max_attempts=2)
        node = start(node_raw(tmp_path / "data", [dest]))
        files = write_series(make_series(2, "CT"), tmp_path / "in")
        assert storescu(node.port, files).returncode == 0
        rows = wait_until(lambda: settled(node), 30, what="series settled")
        assert [r["state"] for r in rows] == ["failed"]
        delivery = deliveries(node)[0]
        assert delivery["attempts"] == 2 and "HTTP 401" in delivery["last_error"]
        assert "not-the-password" not in delivery["last_error"]
        assert node.store.refused_by_destination(rows[0]["id"], "research-web") == []
        assert count(orthanc) == 0
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_destination_down_then_up_resumes_delivery(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    orthanc = web_orthanc(tmp_path / "orthanc")  # down: its ports are free until start()
    node = None
    try:
        # Backoff far longer than the test: only the probe (an HTTP GET) can bring it back.
        dest = web_destination(orthanc, backoff_initial_seconds=60, backoff_max_seconds=60)
        node = start(node_raw(tmp_path / "data", [dest]))
        files = write_series(make_series(3, "CT"), tmp_path / "in")
        assert storescu(node.port, files).returncode == 0
        failed = wait_until(
            lambda: [d for d in deliveries(node) if d["attempts"] >= 1],
            30,
            what="first attempt failed",
        )
        assert "cannot connect" in failed[0]["last_error"]
        assert not echo(parse_config(node_raw(tmp_path / "x", [dest])).destinations[0])
        orthanc.start()
        wait_until(lambda: count(orthanc) == 3, 20, what="delivered after the restart")
        wait_until(lambda: settled(node), 10, what="series forwarded")
        assert [(d["state"], d["attempts"]) for d in deliveries(node)] == [("done", 2)]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_instance_the_server_cannot_parse_is_refused_for_good_and_the_rest_is_stored(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    orthanc = web_orthanc(tmp_path / "orthanc").start()
    try:
        raw = node_raw(tmp_path / "data", [web_destination(orthanc, instances_per_request=10)])
        dest = parse_config(raw).destinations[0]
        series = make_series(3, "CT")
        paths = write_series(series, tmp_path / "in")
        bad = tmp_path / "in" / "bad.dcm"
        bad.write_bytes(b"not a DICOM file" * 20)
        items = [
            Outgoing(n, path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), "1.2.3")
            for n, (ds, path) in enumerate(zip(series, paths, strict=True))
        ]
        items.insert(1, Outgoing(99, bad, "1.2.3.99", items[0].study_uid, "1.2.3"))
        stored, refused = [], []
        send_batch(
            dest,
            items,
            lambda item, url, status: stored.append((item.instance_id, status)),
            lambda item, status, reason: refused.append((item.instance_id, status, reason)),
        )
        assert sorted(stored) == [(0, 0), (1, 0), (2, 0)]
        assert refused == [(99, None, "HTTP 400 to STOW-RS")]
        assert count(orthanc) == 3
    finally:
        orthanc.stop()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"url": ""}, "url"),
        ({"url": "ftp://host/dicom-web"}, "url"),
        ({"url": "http://alice:pw@host/dicom-web"}, "url"),
        ({"password_env": ""}, "password_env"),
        ({"username": ""}, "username"),
        ({"auth": "bearer"}, "token_env"),
        ({"auth": "digest"}, "auth"),
        ({"instances_per_request": 0}, "instances_per_request"),
        ({"ca_file": "/no/such/ca.pem"}, "ca_file"),
        ({"tls_ca": "/etc/hostname"}, "tls_ca"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_dicomweb_config_errors_name_the_key(tmp_path, change, key):
    dest = {
        "name": "web",
        "type": "dicomweb",
        "url": "http://127.0.0.1:8042/dicom-web",
        "auth": "basic",
        "username": USER,
        "password_env": PASSWORD_ENV,
        **change,
    }
    with pytest.raises(ConfigError, match=rf"destinations\[0\]\.{key}\b"):
        parse_config(node_raw(tmp_path / "data", [dest]))


def test_dicomweb_config_defaults_and_trailing_slash(tmp_path):
    dest = {"name": "web", "type": "dicomweb", "url": "https://pacs.example/dicom-web/"}
    parsed = parse_config(node_raw(tmp_path / "data", [dest])).destinations[0]
    assert parsed.url() == "https://pacs.example/dicom-web"
    assert (parsed.auth, parsed.instances_per_request) == ("none", 50)


class StowPeer:
    """A minimal STOW-RS server in this process (http.server on a free loopback port) for the
    answers Orthanc does not give: 202 with a FailureReason per instance, 409, 503.
    reason_for(sop_uid) -> FailureReason or None (stored); http_status overrides the answer."""

    # bare=True: a request with any refused instance gets 409 and no body (nothing named).

    def __init__(
        self,
        reason_for=lambda uid: None,
        http_status: int | None = None,
        bare: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.reason_for = reason_for
        self.http_status = http_status
        self.bare = bare  # refuse with 409 and no body, naming no instance
        self.requests: list[tuple[str, list[str]]] = []  # (Authorization, SOP UIDs)
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                uids = []
                for part in body.split(b"--" + boundary)[1:-1]:
                    data = part.split(b"\r\n\r\n", 1)[1][:-2]
                    uids.append(str(dcmread(BytesIO(data)).SOPInstanceUID))
                peer.requests.append((self.headers.get("Authorization", ""), uids))
                failed, stored = [], []
                for uid in uids:
                    reason = peer.reason_for(uid)
                    entry = {"00081155": {"vr": "UI", "Value": [uid]}}
                    if reason is None:
                        stored.append(entry)
                    else:
                        failed.append({**entry, "00081197": {"vr": "US", "Value": [reason]}})
                status = peer.http_status or (200 if not failed else 202 if stored else 409)
                content: dict = {}
                if failed:
                    content["00081198"] = {"vr": "SQ", "Value": failed}
                if stored:
                    content["00081199"] = {"vr": "SQ", "Value": stored}
                answer = json.dumps(content).encode()
                if peer.bare and failed:
                    status, answer = 409, b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StowPeer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def outgoing(tmp_path: Path, count: int) -> list[Outgoing]:
    series = make_series(count, "CT")
    paths = write_series(series, tmp_path / "in")
    return [
        Outgoing(n, path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), "1.2.3")
        for n, (ds, path) in enumerate(zip(series, paths, strict=True))
    ]


def stow_destination(tmp_path: Path, peer: StowPeer, **extra):
    raw = {
        "name": "web",
        "type": "dicomweb",
        "url": f"http://127.0.0.1:{peer.port}/dicom-web",
        "timeout_seconds": 5,
        **extra,
    }
    return parse_config(node_raw(tmp_path / "data", [raw])).destinations[0]


def test_partial_answer_sorts_instances_into_stored_refused_for_good_and_retried(tmp_path):
    items = outgoing(tmp_path, 5)
    reasons = {items[1].sop_uid: 0xA900, items[2].sop_uid: 0xA700}  # permanent, transient
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    with StowPeer(lambda uid: reasons.get(uid)) as peer:
        dest = stow_destination(
            tmp_path, peer, auth="bearer", token_file=str(token), instances_per_request=3
        )
        stored, refused = [], []
        with pytest.raises(ForwardError, match=r"1 instance\(s\) not stored: FailureReason 0xA700"):
            send_batch(
                dest,
                items,
                lambda item, url, status: stored.append(item.instance_id),
                lambda item, status, reason: refused.append((item.instance_id, status)),
            )
        assert sorted(stored) == [0, 3, 4]
        assert refused == [(1, 0xA900)]
        assert [len(uids) for _, uids in peer.requests] == [3, 2]
        assert {auth for auth, _ in peer.requests} == {"Bearer tok-123"}
        # The retry sends only the transient one; the server now takes it.
        reasons.clear()
        send_batch(dest, [items[2]], lambda i, u, s: stored.append(i.instance_id), None)
        assert sorted(stored) == [0, 2, 3, 4]


@pytest.mark.parametrize("http_status", [503, 401, 429])
def test_server_and_auth_errors_are_transient(tmp_path, http_status):
    items = outgoing(tmp_path, 2)
    with StowPeer(http_status=http_status) as peer:
        dest = stow_destination(tmp_path, peer)
        refused = []
        with pytest.raises(ForwardError, match=f"HTTP {http_status}") as caught:
            send_batch(dest, items, lambda *a: None, lambda *a: refused.append(a))
        assert not isinstance(caught.value, DestinationUnreachableError)
        assert refused == [] and len(peer.requests) == 1
        assert echo(dest)  # it answers HTTP: up


def test_conflict_naming_no_instance_is_isolated_to_the_instance_at_fault(tmp_path):
    items = outgoing(tmp_path, 3)
    bad = items[1].sop_uid
    with StowPeer(lambda uid: 0xC000 if uid == bad else None, bare=True) as peer:
        dest = stow_destination(tmp_path, peer, instances_per_request=3)
        stored, refused = [], []
        send_batch(
            dest,
            items,
            lambda item, url, status: stored.append(item.instance_id),
            lambda item, status, reason: refused.append((item.instance_id, status, reason)),
        )
        assert sorted(stored) == [0, 2]
        assert refused == [(1, None, "HTTP 409 to STOW-RS")]
        assert [len(uids) for _, uids in peer.requests] == [3, 1, 1, 1]


def test_nothing_listening_is_unreachable(tmp_path):
    with StowPeer() as peer:
        dest = stow_destination(tmp_path, peer)
    with pytest.raises(DestinationUnreachableError, match="cannot connect"):
        send_batch(dest, outgoing(tmp_path, 1), lambda *a: None, lambda *a: None)
    assert not echo(dest)


def test_https_is_verified_against_ca_file_and_refused_without_it(tmp_path, pki):  # noqa: F811
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki["server.pem"], pki["server.key"])
    items = outgoing(tmp_path, 2)
    with StowPeer(ssl_context=server) as peer:
        url = f"https://127.0.0.1:{peer.port}/dicom-web"
        trusted = stow_destination(tmp_path, peer, url=url, ca_file=str(pki["ca.pem"]))
        stored = []
        send_batch(trusted, items, lambda i, u, s: stored.append(u), lambda *a: None)
        assert len(stored) == 2 and all(u.startswith(url) for u in stored)
        untrusted = stow_destination(tmp_path, peer, url=url)  # system CAs only
        with pytest.raises(DestinationUnreachableError, match="CERTIFICATE_VERIFY_FAILED"):
            send_batch(untrusted, items, lambda *a: None, lambda *a: None)
        assert len(peer.requests) == 1


def test_node_reports_an_instance_refused_for_good_and_retry_sends_only_it(tmp_path, capsys):
    seen: list[str] = []
    refuse = {"on": True}

    def reason_for(uid: str) -> int | None:
        seen.append(uid)
        return 0xA900 if refuse["on"] and len(seen) == 2 else None

    with StowPeer(reason_for) as peer:
        dest = {
            "name": "research-web",
            "type": "dicomweb",
            "url": f"http://127.0.0.1:{peer.port}/dicom-web",
            "instances_per_request": 3,
            "max_attempts": 3,
            "backoff_initial_seconds": 0.2,
            "timeout_seconds": 5,
        }
        raw = node_raw(tmp_path / "data", [dest])
        config = write_config(tmp_path / "node.toml", raw)
        node = start(raw)
        try:
            series = make_series(4, "CT")
            assert storescu(node.port, write_series(series, tmp_path / "in")).returncode == 0
            rows = wait_until(lambda: settled(node), 30, what="series settled")
            assert [r["state"] for r in rows] == ["failed"]
            row = deliveries(node)[0]
            assert (row["state"], row["attempts"]) == ("failed", 1)
            assert "0xA900" in row["last_error"]
            states = [r["destinations"]["research-web"] for r in node.store.reports()]
            assert sorted(s["state"] for s in states) == ["refused", "sent", "sent", "sent"]
            assert len(seen) == 4, "the refused instance was offered once"

            # The cause is fixed: `retry` offers the refused instance again, and only it.
            refuse["on"] = False
            uid = series[0].SeriesInstanceUID
            assert cli_main(["retry", "--config", str(config), "--series", uid]) == 0
            capsys.readouterr()
            wait_until(
                lambda: (settled(node) or [{}])[0].get("state") == "forwarded",
                30,
                what="forwarded after retry",
            )
        finally:
            node.stop()
    assert len(seen) == 5 and len(set(seen)) == 4
