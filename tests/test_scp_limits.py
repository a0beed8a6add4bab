"""Network limits of the SCP (scp/server.py, scp/limits.py), with real peers on loopback:
DCMTK echoscu/storescu, pynetdicom, and raw sockets for what real tools never send.

Each test plants the fault (idle sockets, an oversized PDU, a stream past a limit) and shows the
node refuses it before the bytes land while other peers are still served.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance, write_series
from peers import echoscu, free_port, storescu, wait_until
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler
from rawdicom import associate_rq, closed_by_peer, pdata_tf, pdu_header, read_pdu
from structlog.testing import capture_logs

from deid_node.config import parse_config
from deid_node.scp import enable_chunked_receive, start_server
from deid_node.scp.limits import MB, Refusal, StreamGuard, StreamLimits
from deid_node.scp.server import Connection, NodeServer, acceptor_association
from deid_node.store import Store

pytestmark = [pytest.mark.network]


@pytest.fixture(autouse=True)
def collect_client_sockets():
    """pynetdicom (the client side, in this process) leaves the socket of an aborted
    association to the garbage collector; collect them in the test that made them."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def scp(tmp_path) -> Iterator:
    """start(**node keys) -> the running NodeServer, as the node starts it (chunked receive)."""
    servers: list[tuple[NodeServer, Store]] = []
    enable_chunked_receive(tmp_path / "data" / "tmp")

    def start(**node) -> NodeServer:
        raw = {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")}
        config = parse_config({"node": {"min_free_disk_mb": 0, **raw, **node}}).node
        store = Store(config.data_dir)
        server = start_server(config, store)
        servers.append((server, store))
        return server

    yield start
    for server, store in servers:
        server.stop(2)
        store.close()
    _config.STORE_RECV_CHUNKED_DATASET = False
    _config.STORE_SEND_CHUNKED_DATASET = False
    tempfile.tempdir = None


def port_of(server: NodeServer) -> int:
    return server.server_address[1]


@contextlib.contextmanager
def idle_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections that send nothing."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def pending(server: NodeServer) -> int:
    return server.connection_counts()["pending"]


def tmp_bytes(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "data" / "tmp").iterdir())


# -- idle and half-open connections --------------------------------------------------------------


def test_forty_idle_sockets_leave_every_association_slot_free(scp, tmp_path):
    server = scp()
    port = port_of(server)
    with idle_sockets(port, 40):
        wait_until(lambda: pending(server) == 40, 10, what="40 connections accepted")
        echo = echoscu(port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        stored = storescu(port, write_series([make_instance("CT")], tmp_path / "in"))
        assert stored.returncode == 0, stored.stdout + stored.stderr


def test_past_max_pending_connections_the_oldest_idle_one_is_closed(scp):
    server = scp(max_pending_connections=4)
    with idle_sockets(port_of(server), 6) as socks:
        assert closed_by_peer(socks[0]) and closed_by_peer(socks[1])
        wait_until(lambda: pending(server) == 4, 10, what="four pending left")
        assert echoscu(port_of(server)).returncode == 0  # evicts the oldest idle again
        assert closed_by_peer(socks[2])


def test_connection_without_a_request_is_closed_after_the_request_timeout(scp):
    server = scp(association_request_timeout_seconds=1)
    with capture_logs() as logs, idle_sockets(port_of(server), 1) as [sock]:
        sock.sendall(associate_rq()[:20])  # half an A-ASSOCIATE-RQ, then nothing
        assert closed_by_peer(sock, timeout=10)
        wait_until(lambda: pending(server) == 0, 5, what="pending connection forgotten")
    assert any(
        e["event"] == "connection_closed" and "association_request_timeout" in e["reason"]
        for e in logs
    )


def test_associations_beyond_max_associations_are_rejected_with_local_limit(scp):
    server = scp(max_associations=2)
    port = port_of(server)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="DEID_NODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        refused = echoscu(port)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    finally:
        for assoc in held:
            assoc.release()
    wait_until(lambda: server.connection_counts()["associations"] == 0, 10, what="slots freed")
    assert echoscu(port).returncode == 0


def test_stop_returns_promptly_with_idle_and_half_open_connections(scp):
    server = scp()
    with idle_sockets(port_of(server), 30) as socks:
        socks[0].sendall(associate_rq()[:30])
        wait_until(lambda: pending(server) == 30, 10, what="30 connections accepted")
        started = time.monotonic()
        server.stop(30)  # grace for associations in progress: there are none
        took = time.monotonic() - started
        assert all(closed_by_peer(s, timeout=5) for s in socks)
    # Not a timing assertion: the grace (30 s) was not waited for idle sockets.
    assert took < 30, f"stop waited {took:.1f} s for connections without an association"


# -- limits on what arrives ---------------------------------------------------------------------


def raw_association(port: int, called: str = "DEID_NODE") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(called=called))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got {pdu_type}"
    return sock


def test_pdu_longer_than_max_pdu_is_aborted_before_its_body_is_read(scp):
    server = scp(max_pdu_kb=64)
    with capture_logs() as logs:
        sock = raw_association(port_of(server))
        with sock:
            sock.sendall(pdu_header(0x04, 512 * MB))  # declares 512 MiB, sends 4 KiB
            with contextlib.suppress(OSError):
                sock.sendall(b"\0" * 4096)
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x07 and body[2:4] == b"\x02\x06"  # A-ABORT, provider, invalid
            assert closed_by_peer(sock)
    aborted = [e for e in logs if e["event"] == "association_aborted"]
    assert aborted and aborted[0]["reason"] == "PDU longer than node.max_pdu_kb"
    assert aborted[0]["received"] < 64 * 1024, "the body of the oversized PDU was read"
    assert echoscu(port_of(server)).returncode == 0


def test_announced_maximum_pdu_is_max_pdu_kb(scp):
    server = scp(max_pdu_kb=32)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port_of(server), ae_title="DEID_NODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 32 * 1024
    assoc.release()


def test_oversized_association_request_is_refused(scp):
    server = scp()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(pdu_header(0x01, (4 << 30) - 1) + b"\0" * 1024)  # a 4 GiB A-ASSOCIATE-RQ
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == 0x07
        assert closed_by_peer(sock)
    assert echoscu(port_of(server)).returncode == 0


def test_first_pdu_other_than_an_association_request_is_aborted(scp):
    server = scp()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(pdata_tf(1, 0x03, b"\0" * 40))  # data before any association
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x07 and body[2:4] == b"\x02\x02"  # A-ABORT, unexpected PDU
        assert closed_by_peer(sock)
    assert echoscu(port_of(server)).returncode == 0


def big_instance(folder: Path, mib: float) -> list[Path]:
    side = int((mib * MB / 2) ** 0.5)
    return write_series([make_instance("CT", rows=side, columns=side)], folder)


def test_stream_over_max_instance_is_aborted_before_it_lands(scp, tmp_path):
    server = scp(max_instance_mb=1)
    with capture_logs() as logs:
        sent = storescu(port_of(server), big_instance(tmp_path / "in", 16))
    assert sent.returncode != 0
    [aborted] = [e for e in logs if e["event"] == "association_aborted"]
    assert aborted["reason"] == "instance larger than node.max_instance_mb"
    # Read from the peer: the limit and at most one chunk more, not the 16 MiB it sent; the
    # partial file is deleted at once.
    assert aborted["received"] <= 1 * MB + 256 * 1024
    assert tmp_bytes(tmp_path) == 0
    assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))
    assert storescu(port_of(server), big_instance(tmp_path / "small", 0.5)).returncode == 0


def test_free_disk_is_checked_as_the_dataset_streams_in(scp, tmp_path):
    server = scp(min_free_disk_mb=1 << 30)  # 1 PiB: never free
    with capture_logs() as logs:
        sent = storescu(port_of(server), big_instance(tmp_path / "in", 8))
    assert sent.returncode != 0
    [aborted] = [e for e in logs if e["event"] == "association_aborted"]
    assert aborted["reason"] == "free disk below node.min_free_disk_mb"
    assert aborted["received"] <= 256 * 1024, "the data set streamed on before the check"
    assert tmp_bytes(tmp_path) == 0
    assert echoscu(port_of(server)).returncode == 0  # no data set: no disk needed


def test_association_past_max_association_mb_is_aborted(scp, tmp_path):
    server = scp(max_association_mb=1)
    files = [big_instance(tmp_path / f"in{i}", 0.5)[0] for i in range(4)]  # ~0.5 MiB each
    with capture_logs() as logs:
        sent = storescu(port_of(server), files)
    assert sent.returncode != 0
    assert [e.get("reason") for e in logs if e["event"] == "association_aborted"] == [
        "association larger than node.max_association_mb"
    ]


def test_association_past_max_association_seconds_is_aborted_at_its_next_bytes(scp):
    server = scp(max_association_seconds=1)
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port_of(server), ae_title="DEID_NODE")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    with capture_logs() as logs, warnings.catch_warnings():
        # pynetdicom's client drops its socket unclosed when shutdown() fails on a connection
        # the peer reset (AssociationSocket._shutdown_socket): not ours to fix here.
        warnings.simplefilter("ignore", ResourceWarning)
        time.sleep(1.5)
        rsp = assoc.send_c_echo()
        wait_until(lambda a=assoc: a.is_aborted, 10, what="association aborted")
        del assoc
        gc.collect()
    assert "Status" not in rsp
    assert any(
        e.get("reason") == "association longer than node.max_association_seconds" for e in logs
    )


# -- what pynetdicom must still do for the transport to hold -------------------------------------


def comparable(value):
    if hasattr(value, "as_tuple"):  # AddressInformation
        return value.as_tuple
    if isinstance(value, list):
        return [str(v) for v in value]
    return repr(value)


def test_acceptor_association_matches_pynetdicoms(scp):
    """acceptor_association mirrors pynetdicom's RequestHandler._create_association (3.0.x).

    Fails when a pynetdicom upgrade changes how an acceptor is set up: re-read transport.py
    (RequestHandler, AssociationSocket) and update scp/server.py."""
    server = scp()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        handler = RequestHandler.__new__(RequestHandler)
        handler.server, handler.request, handler.client_address = server, a, ("127.0.0.1", 5)
        theirs = handler._create_association()
        conn = Connection(c, ("127.0.0.1", 5), server.limits)
        ours = acceptor_association(server, conn, b"")
        assert set(vars(ours)) == set(vars(theirs)), "pynetdicom sets up other attributes"
        for side in ("acceptor", "requestor"):
            mine, pynd = vars(getattr(ours, side)), vars(getattr(theirs, side))
            assert set(mine) == set(pynd)
            for key in mine:
                if key in ("_assoc", "assoc"):
                    # The association itself (compared above): its thread's name carries the
                    # second it was made, so two made a second apart differ in repr.
                    assert type(mine[key]) is type(pynd[key]), f"{side}.{key}"
                else:
                    assert comparable(mine[key]) == comparable(pynd[key]), f"{side}.{key}"
        for event in server.get_events():
            assert ours.get_handlers(event) == theirs.get_handlers(event), event.name
        assert type(theirs.dul.socket) is AssociationSocket
        assert isinstance(ours.dul.socket, AssociationSocket)
        conn.close()
    finally:
        for s in (a, b, c, d):
            s.close()


# -- the stream guard alone ---------------------------------------------------------------------


def limits(tmp_path: Path, **changes) -> StreamLimits:
    values = {
        "max_pdu_bytes": 16384,
        "max_association_bytes": 0,
        "max_instance_bytes": 1000,
        "min_free_disk_bytes": 0,
        "data_dir": tmp_path,
        **changes,
    }
    return StreamLimits(**values)


def message(dataset: int) -> bytes:
    """A command PDV (last fragment) then the data set in PDVs of 100 bytes."""
    out = pdata_tf(1, 0x03, b"c" * 40)
    for start in range(0, dataset, 100):
        last = 0x02 if start + 100 >= dataset else 0x00
        out += pdata_tf(1, last, b"d" * min(100, dataset - start))
    return out


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 106, 4096])
def test_stream_guard_counts_data_sets_across_any_chunking(tmp_path, chunk):
    stream = message(900) + message(1000)  # each within 1000 bytes: accepted
    guard = StreamGuard(limits(tmp_path))
    for at in range(0, len(stream), chunk):
        guard.feed(stream[at : at + chunk])
    assert guard.at_pdu_boundary and guard.dataset_bytes == 1000 and guard.message_complete
    over = StreamGuard(limits(tmp_path))
    with pytest.raises(Refusal, match="max_instance_mb"):
        data = message(1001)
        for at in range(0, len(data), chunk):
            over.feed(data[at : at + chunk])


def test_stream_guard_refuses_a_long_pdu_from_its_header(tmp_path):
    guard = StreamGuard(limits(tmp_path))
    guard.feed(pdu_header(0x04, 16384))  # exactly the maximum: fine
    with pytest.raises(Refusal, match="max_pdu_kb"):
        StreamGuard(limits(tmp_path)).feed(pdu_header(0x04, 16385))
    with pytest.raises(Refusal, match="association PDU"):
        StreamGuard(limits(tmp_path)).feed(struct.pack(">BBL", 0x05, 0, 1 << 20))
