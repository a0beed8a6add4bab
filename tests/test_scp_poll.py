"""The SCP's DUL thread polls fast while an association is busy and at pynetdicom's pace once it
is idle (scp.server.GuardedSocket, issue 17); the pynetdicom internal it sets still exists."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from deid_node.config import NodeConfig
from deid_node.scp.ae import network_limits
from deid_node.scp.server import (
    ACTIVE_SECONDS,
    FAST_POLL_SECONDS,
    IDLE_POLL_SECONDS,
    Connection,
    GuardedSocket,
    set_poll_delay,
)


def test_pynetdicom_still_reads_the_poll_delay_we_set() -> None:
    # Fails on an upgrade that renames it: set_poll_delay would then change nothing.
    assoc = Association(AE(), "acceptor")
    assert isinstance(assoc.dul, DULServiceProvider)
    assert assoc.dul._run_loop_delay == IDLE_POLL_SECONDS  # noqa: SLF001 - pynetdicom's default
    set_poll_delay(assoc, FAST_POLL_SECONDS)
    assert assoc.dul._run_loop_delay == FAST_POLL_SECONDS  # noqa: SLF001


@pytest.fixture
def guarded(tmp_path: Path):  # noqa: ANN201
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    limits = network_limits(NodeConfig(data_dir=tmp_path))
    conn = Connection(ours, ("127.0.0.1", 11112), limits)
    guarded = GuardedSocket(assoc, conn, b"")
    guarded._is_connected = True  # noqa: SLF001 - as after pynetdicom's set_socket
    yield guarded, assoc, peer
    peer.close()
    conn.close()


def _delay(assoc: Association) -> float:
    return assoc.dul._run_loop_delay  # noqa: SLF001


def test_busy_association_polls_fast_then_idles_back(guarded) -> None:  # noqa: ANN001
    sock, assoc, peer = guarded
    assert sock.ready is False and _delay(assoc) == IDLE_POLL_SECONDS  # nothing yet: idle pace
    peer.sendall(b"\x04\x00\x00\x00\x00\x02ab")  # a P-DATA-TF arrives
    assert sock.ready is True and _delay(assoc) == FAST_POLL_SECONDS
    sock.recv(8)
    assert sock.ready is False and _delay(assoc) == FAST_POLL_SECONDS  # the next one may follow
    deadline = time.monotonic() + 5
    while _delay(assoc) != IDLE_POLL_SECONDS and time.monotonic() < deadline:
        time.sleep(ACTIVE_SECONDS / 4)
        assert sock.ready is False
    assert _delay(assoc) == IDLE_POLL_SECONDS


def test_an_answer_sent_makes_it_poll_fast_for_the_next_request(guarded) -> None:  # noqa: ANN001
    sock, assoc, peer = guarded
    assert sock.ready is False and _delay(assoc) == IDLE_POLL_SECONDS
    sock.send(b"\x04\x00\x00\x00\x00\x00")
    assert peer.recv(6) == b"\x04\x00\x00\x00\x00\x00"
    assert _delay(assoc) == FAST_POLL_SECONDS
