"""Connections, from accept to close: each in its own thread, bounded before pynetdicom runs.

pynetdicom's server does the TLS handshake on its accept thread with no timeout, and starts an
association (two threads, one slot of `maximum_associations`) for every TCP connection, even
one that never sends a byte: 40 idle sockets made every modality fail with "Local Limit
Exceeded", and one idle TLS connection stopped all others. Here, per connection:

1. accepted (accept thread): registered as *pending*; past `max_pending_connections` the oldest
   pending connection is closed (a modality sends its A-ASSOCIATE-RQ within milliseconds, an
   idle socket never does);
2. own thread: TLS handshake, then the complete A-ASSOCIATE-RQ, both within
   `association_request_timeout_seconds` (the accept loop closes a pending connection past it);
3. only then does it count as an association: beyond `max_associations` it is rejected
   (A-ASSOCIATE-RJ transient, local limit exceeded); otherwise pynetdicom takes it, reading the
   request we already read from `GuardedSocket`, which feeds every later byte to a
   `StreamGuard` (PDU size, association bytes and time, instance size, free disk) before
   handing it on.

Stopping never calls pynetdicom's abort() from outside its threads (its state machine raised
"Invalid event Evt15 for state Sta13" when an association was already closing): it closes the
transport, which pynetdicom handles in every state as the peer going away.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    ThreadedAssociationServer,
)

from deid_node.log import get_logger
from deid_node.scp.limits import (
    ASSOCIATE_RQ,
    MAX_ASSOCIATION_PDU_BYTES,
    Refusal,
    StreamGuard,
    StreamLimits,
    a_abort,
    associate_rj,
    associate_rq_calling_ae,
)

log = get_logger("deid_node.scp")

RECV_CHUNK = 64 * 1024
# pynetdicom's DUL thread sleeps 1 ms between polls whenever it had nothing to do; a C-STORE
# waits for it two or three times (the first PDU, a gap in the stream, the response), about
# a fifth of a 512 KB instance's round trip. While PDUs flow, and for ACTIVE_SECONDS after,
# it polls every FAST_POLL_SECONDS; an idle association goes back to pynetdicom's 1 ms.
FAST_POLL_SECONDS = 0.0002
IDLE_POLL_SECONDS = 0.001
ACTIVE_SECONDS = 0.1
# At stop, an association that sent nothing for this long and awaits no answer is closed.
STOP_IDLE_SECONDS = 2.0
# A-ASSOCIATE-RJ source 3 (service provider, presentation): 1 temporary congestion, 2 limit.
RJ_SOURCE_PRESENTATION, RJ_CONGESTION, RJ_LOCAL_LIMIT = 3, 1, 2
# A-ABORT reason 2: unexpected PDU (the first PDU was not an A-ASSOCIATE-RQ).
ABORT_UNEXPECTED_PDU = 0x02


@dataclass(frozen=True)
class NetworkLimits:
    max_associations: int
    max_pending_connections: int
    request_timeout_seconds: float
    max_association_seconds: float  # 0: no limit
    network_timeout_seconds: float
    stream: StreamLimits


class Connection:
    """One TCP connection: its socket, its guard, and how to close it from any thread."""

    def __init__(self, sock: socket.socket, address: Any, limits: NetworkLimits) -> None:
        self.sock = sock
        # A second descriptor of the same socket: shutdown() through it wakes a recv or a TLS
        # handshake blocked on `sock` in another thread, even after ssl detached `sock`.
        self._control = sock.dup()
        self.address = address
        self.limits = limits
        self.opened = time.monotonic()
        self.last_received = self.opened
        self.guard = StreamGuard(limits.stream)
        self.calling_ae = ""
        self.cut_reason: str | None = None
        self.thread: threading.Thread | None = None

    @property
    def peer(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def cut(self, reason: str) -> None:
        """Close the transport under whoever uses it (safe from any thread, idempotent)."""
        if self.cut_reason is None:
            self.cut_reason = reason
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut(self.cut_reason or "closed")
        for sock in (self.sock, self._control):
            with contextlib.suppress(OSError):
                sock.close()

    def recv_timeout(self) -> float:
        """Seconds the next read may wait; Refusal once the association's time is up."""
        timeout = self.limits.network_timeout_seconds
        if self.limits.max_association_seconds:
            left = self.opened + self.limits.max_association_seconds - time.monotonic()
            if left <= 0:
                raise Refusal("association longer than node.max_association_seconds")
            timeout = min(timeout, left)
        return timeout

    def idle_for(self, now: float) -> float:
        return now - self.last_received


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper, fed the A-ASSOCIATE-RQ we already read, and guarding every
    later byte: a chunk past a limit is never handed on; the peer gets an A-ABORT and the
    transport closes, which pynetdicom sees as the connection closing (Evt17)."""

    def __init__(self, assoc: Association, conn: Connection, request: bytes) -> None:
        super().__init__(assoc, client_socket=conn.sock)
        self._conn = conn
        self._unread = bytearray(request)
        self._active_until = 0.0
        self._fast = False

    @property
    def ready(self) -> bool:
        if self._unread and self.socket is not None:
            return True
        ready = bool(super().ready)
        self._pace(ready)
        return ready

    def _pace(self, active: bool) -> None:
        """Poll fast while the association is busy, at pynetdicom's pace once it is idle."""
        now = time.monotonic()
        if active:
            self._active_until = now + ACTIVE_SECONDS
        fast = now < self._active_until
        if fast != self._fast:
            self._fast = fast
            set_poll_delay(self.assoc, FAST_POLL_SECONDS if fast else IDLE_POLL_SECONDS)

    def recv(self, nr_bytes: int) -> bytearray:
        data = bytearray(self._unread[:nr_bytes])
        del self._unread[:nr_bytes]
        conn = self._conn
        while len(data) < nr_bytes and self.socket is not None:
            try:
                self.socket.settimeout(conn.recv_timeout())
                chunk = self.socket.recv(min(RECV_CHUNK, nr_bytes - len(data)))
                if not chunk:
                    break
                conn.guard.feed(chunk)
            except Refusal as refusal:
                self._abort(refusal)
                break
            except TimeoutError:
                self._abort(Refusal("no data for node.network_timeout_seconds mid-PDU"))
                break
            except OSError:
                break  # closed under us (stop, or the peer): a short read is Evt17
            except Exception as exc:  # never into pynetdicom's reactor
                self._abort(Refusal("unexpected error", error_type=type(exc).__name__))
                break
            conn.last_received = time.monotonic()
            data += chunk
        return data

    def send(self, bytestream: bytes) -> None:
        self._conn.guard.message_complete = False  # answered
        super().send(bytestream)
        self._pace(True)  # the peer's next request follows the answer

    def _abort(self, refusal: Refusal) -> None:
        conn = self._conn
        with contextlib.suppress(Exception):
            log.warning(
                "association_aborted",
                **refusal.fields,
                reason=refusal.reason,
                calling_ae=conn.calling_ae,
                peer=conn.peer,
                received=conn.guard.received,
            )
        if self.socket is not None:
            with contextlib.suppress(OSError, ValueError):
                self.socket.settimeout(1.0)
                self.socket.sendall(a_abort(refusal.abort_reason))
        conn.cut(refusal.reason)


def set_poll_delay(assoc: Association, seconds: float) -> None:
    """How long the association's DUL thread sleeps when it had nothing to do.

    pynetdicom internal (3.0: DULServiceProvider._run_loop_delay, read on every loop); the one
    place that sets it. tests/test_scp_poll.py fails if an upgrade removes it."""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds  # noqa: SLF001


def discard_partial_dataset(assoc: Association) -> None:
    """Close and delete the file pynetdicom was streaming a data set into, when the association
    ended mid-message: pynetdicom leaves it open (a leaked descriptor, and a ResourceWarning
    when collected) and on disk until the spool's stale-tmp sweep.

    pynetdicom internals (3.0: DIMSEServiceProvider.message, DIMSEMessage._data_set_file and
    _data_set_path); call only once the association's threads have ended.
    tests/test_scp_limits.py::test_stream_over_max_instance_is_aborted_before_it_lands fails
    if an upgrade moves them (the file stays in tmp/)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    with contextlib.suppress(OSError):
        handle.close()
    path = getattr(message, "_data_set_path", None)
    if isinstance(path, Path):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def acceptor_association(server: NodeServer, conn: Connection, request: bytes) -> Association:
    """An acceptor Association for `conn`, set up as pynetdicom's RequestHandler does.

    The one place that mirrors pynetdicom's internals (`RequestHandler._create_association`,
    3.0): tests/test_scp.py compares the two, so an upgrade that changes it fails there.
    """
    assoc = Association(server.ae, "acceptor")
    assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
    assoc.set_socket(GuardedSocket(assoc, conn, request))
    acceptor = assoc.acceptor
    acceptor.maximum_length = server.ae.maximum_pdu_size
    acceptor.ae_title = server.ae_title
    acceptor.address_info = AddressInformation.from_tuple(server.server_address)
    acceptor.implementation_class_uid = server.ae.implementation_class_uid
    acceptor.implementation_version_name = server.ae.implementation_version_name
    acceptor.supported_contexts = deepcopy(server.contexts)
    assoc.requestor.address_info = AddressInformation.from_tuple(conn.address)
    for event in server.get_events():
        bound = server.get_handlers(event)
        if event.is_intervention:
            if bound:
                assoc.bind(event, *bound)
        else:
            for handler, args in bound:
                assoc.bind(event, handler, args)
    return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's association server, with connections handled as the module says.

    Made by `AE.make_server(server_class=NodeServer, limits=...)`, pynetdicom's hook for a
    custom server; `stop()` ends it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, limits: NetworkLimits, **kwargs: Any) -> None:
        self.limits = limits
        self.stopping = False
        self._lock = threading.Lock()
        self._pending: dict[Connection, None] = {}  # insertion order: oldest first
        self._associations: set[Connection] = set()
        self._conn_threads: set[threading.Thread] = set()
        super().__init__(*args, **kwargs)

    # -- accept thread ----------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, Any]:
        # No TLS here: the handshake runs in the connection's own thread, with a deadline.
        assert self.socket is not None
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            conn = Connection(request, client_address, self.limits)
        except OSError as exc:  # out of file descriptors: refuse this one, keep serving
            log.error("connection_refused", error_type=type(exc).__name__)
            request.close()
            return
        evicted = []
        with self._lock:
            while len(self._pending) >= self.limits.max_pending_connections:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                evicted.append(oldest)
            self._pending[conn] = None
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"Connection@{conn.peer}", daemon=True
            )
            conn.thread = thread
            self._conn_threads.add(thread)
        for old in evicted:
            old.cut("more connections without an A-ASSOCIATE-RQ than node.max_pending_connections")
        thread.start()

    def service_actions(self) -> None:
        """Between accepts (every 0.5 s): close pending connections past their deadline."""
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            late = [
                c for c in self._pending if now - c.opened > self.limits.request_timeout_seconds
            ]
        for conn in late:
            conn.cut("no A-ASSOCIATE-RQ within node.association_request_timeout_seconds")

    def shutdown(self) -> None:
        """Stop the accept loop and close the listening socket. (pynetdicom's shutdown also
        removes the server from AE._servers, where its start_server puts it; ours is started by
        scp.start_server and is not there.)"""
        socketserver.TCPServer.shutdown(self)
        self.server_close()

    # -- connection thread ------------------------------------------------------------------

    def _serve(self, conn: Connection) -> None:
        try:
            request = self._read_association_request(conn)
            if request is not None:
                self._associate(conn, request)
        except Exception as exc:  # never let an exception end a thread unlogged
            log.error("connection_error", peer=conn.peer, error_type=type(exc).__name__)
        finally:
            with self._lock:
                self._pending.pop(conn, None)
                self._associations.discard(conn)
                self._conn_threads.discard(threading.current_thread())
            conn.close()

    def _read_association_request(self, conn: Connection) -> bytes | None:
        """The complete A-ASSOCIATE-RQ PDU, after the TLS handshake; None if the connection
        closed, timed out or sent something else (logged)."""
        deadline = conn.opened + self.limits.request_timeout_seconds
        try:
            if self.ssl_context is not None:
                conn.sock.settimeout(_left(deadline))
                conn.sock = self.ssl_context.wrap_socket(conn.sock, server_side=True)
            header = _recv_exactly(conn.sock, 6, deadline)
            if len(header) == 6:
                conn.guard.feed(header)
                if header[0] != ASSOCIATE_RQ:
                    with contextlib.suppress(OSError):
                        conn.sock.sendall(a_abort(ABORT_UNEXPECTED_PDU))
                    conn.cut("first PDU is not an A-ASSOCIATE-RQ")
                    log.warning("connection_closed", peer=conn.peer, reason=conn.cut_reason)
                    return None
                body = _recv_exactly(conn.sock, int.from_bytes(header[2:6], "big"), deadline)
                conn.guard.feed(body)
                request = header + body
                if len(request) == 6 + int.from_bytes(header[2:6], "big"):
                    conn.last_received = time.monotonic()
                    return request
        except TimeoutError:
            conn.cut("no A-ASSOCIATE-RQ within node.association_request_timeout_seconds")
        except ssl.SSLError as exc:
            if conn.cut_reason is None:  # not cut by us: the handshake itself failed
                log.warning(
                    "tls_handshake_failed", peer=conn.peer, reason=exc.reason or type(exc).__name__
                )
                return None
        except Refusal as refusal:
            with contextlib.suppress(OSError):
                conn.sock.sendall(a_abort(refusal.abort_reason))
            conn.cut(refusal.reason)
            log.warning("connection_closed", peer=conn.peer, reason=refusal.reason)
            return None
        except OSError:
            pass  # reset by the peer, or cut by us
        if conn.cut_reason in (None, "node stopping"):  # a probe, or counted at stop
            reason = conn.cut_reason or "closed before an A-ASSOCIATE-RQ"
            log.debug("connection_closed", peer=conn.peer, reason=reason)
        else:
            log.info("connection_closed", peer=conn.peer, reason=conn.cut_reason)
        return None

    def _associate(self, conn: Connection, request: bytes) -> None:
        conn.calling_ae = associate_rq_calling_ae(request)
        with self._lock:
            self._pending.pop(conn, None)
            if self.stopping:
                refused: tuple[int, str] | None = (RJ_CONGESTION, "node stopping")
            elif len(self._associations) >= self.limits.max_associations:
                refused = (RJ_LOCAL_LIMIT, "node.max_associations reached")
            else:
                refused = None
                self._associations.add(conn)
        if refused is not None:
            log.warning(
                "association_refused", calling_ae=conn.calling_ae, peer=conn.peer, reason=refused[1]
            )
            with contextlib.suppress(OSError):
                conn.sock.settimeout(2.0)
                conn.sock.sendall(associate_rj(RJ_SOURCE_PRESENTATION, refused[0]))
            return
        assoc = acceptor_association(self, conn, request)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": conn.address})
        assoc.start()
        assoc.join()
        discard_partial_dataset(assoc)

    # -- stop -------------------------------------------------------------------------------

    def stop(self, grace_seconds: float) -> None:
        """Refuse new associations, close pending connections now, let associations in progress
        finish for up to `grace_seconds` (closing those idle for STOP_IDLE_SECONDS), close the
        rest, stop accepting. Returns within about grace_seconds + 5 s whatever peers do."""
        with self._lock:
            self.stopping = True
            pending = list(self._pending)
        for conn in pending:
            conn.cut("node stopping")
        if pending:
            log.info("connections_closed_at_stop", connections=len(pending))
        deadline = time.monotonic() + grace_seconds
        while True:
            with self._lock:
                active = list(self._associations)
            now = time.monotonic()
            if not active:
                break
            for conn in active:
                if conn.cut_reason is not None:
                    continue
                if now >= deadline:
                    log.warning(
                        "association_aborted_at_stop", calling_ae=conn.calling_ae, peer=conn.peer
                    )
                    conn.cut("node stopping")
                elif conn.idle_for(now) > STOP_IDLE_SECONDS and not conn.guard.message_complete:
                    log.info("association_closed_at_stop", calling_ae=conn.calling_ae, idle=True)
                    conn.cut("node stopping")
            if now >= deadline + 5:
                break
            time.sleep(0.05)
        self.shutdown()
        with self._lock:
            threads = list(self._conn_threads)
        join_by = time.monotonic() + 5
        for thread in threads:
            thread.join(timeout=max(0.0, join_by - time.monotonic()))
        left = sum(t.is_alive() for t in threads)
        if left:
            log.warning("connections_left_at_stop", connections=left)

    def connection_counts(self) -> dict[str, int]:
        with self._lock:
            return {"pending": len(self._pending), "associations": len(self._associations)}


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Up to `count` bytes (fewer if the peer closed); TimeoutError past `deadline`."""
    if count > MAX_ASSOCIATION_PDU_BYTES + 6:
        raise Refusal("PDU longer than the association PDU limit")
    data = bytearray()
    while len(data) < count:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(min(RECV_CHUNK, count - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)
