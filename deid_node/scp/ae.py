"""The node's pynetdicom AE: contexts, timeouts, who may associate, TLS, and its server."""

from __future__ import annotations

import ipaddress
import multiprocessing.util
import ssl
import tempfile
import threading
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_node.config import NodeConfig, TlsConfig
from deid_node.log import get_logger
from deid_node.routing import Router
from deid_node.scp.handlers import Routes, StoreLimits, handlers
from deid_node.scp.limits import MB, StreamLimits
from deid_node.scp.server import NetworkLimits, NodeServer
from deid_node.store import Store

log = get_logger("deid_node.scp")


def build_ae(node: NodeConfig, router: Router | None = None) -> AE:
    ae = NodeAE(node.ae_title, PeerPolicy(node), router)
    # Every storage SOP class with every transfer syntax pynetdicom knows: we store bytes as
    # sent, so a compressed syntax costs nothing here.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    ae.network_timeout = node.network_timeout_seconds
    ae.acse_timeout = ae.dimse_timeout = node.network_timeout_seconds
    # The largest P-DATA-TF PDU we announce, and accept (NodeServer aborts a longer one).
    ae.maximum_pdu_size = node.max_pdu_kb * 1024
    # NodeServer counts associations itself, before pynetdicom sees one, and frees a slot only
    # once its thread ended: pynetdicom's own count never exceeds this, it never refuses first.
    ae.maximum_associations = node.max_associations
    return ae


def store_limits(node: NodeConfig) -> StoreLimits:
    return StoreLimits(
        max_instance_bytes=node.max_instance_mb * MB,
        min_free_disk_bytes=node.min_free_disk_mb * MB,
        max_decoded_bytes=node.max_decoded_mb * MB,
    )


def network_limits(node: NodeConfig, data_dir: Path | None = None) -> NetworkLimits:
    """`data_dir`: where received bytes land (node.data_dir, or a shared folder)."""
    return NetworkLimits(
        max_associations=node.max_associations,
        max_pending_connections=node.max_pending_connections,
        request_timeout_seconds=node.association_request_timeout_seconds,
        max_association_seconds=node.max_association_seconds,
        network_timeout_seconds=node.network_timeout_seconds,
        stream=StreamLimits(
            max_pdu_bytes=node.max_pdu_kb * 1024,
            max_association_bytes=node.max_association_mb * MB,
            max_instance_bytes=node.max_instance_mb * MB,
            min_free_disk_bytes=node.min_free_disk_mb * MB,
            data_dir=data_dir or node.data_dir,
        ),
    )


def start_server(
    node: NodeConfig,
    store: Store,
    limits: StoreLimits | None = None,
    router: Router | None = None,
) -> NodeServer:
    """Listen on node.host:port (OSError if it cannot) and serve in a background thread;
    `server.stop(grace)` ends it. `limits` overrides the handlers' limits (tests). `router`:
    the projects (none: the node's AE title only, everything to the default project)."""
    ae = build_ae(node, router)
    server = ae.make_server(
        (node.host, node.port),
        ssl_context=server_ssl_context(node.tls) if node.tls else None,
        evt_handlers=handlers(store, limits or store_limits(node), Routes(router)),
        server_class=NodeServer,
        limits=network_limits(node, store.data_dir),
    )
    threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
    return server


def enable_chunked_receive(tmp_dir: Path) -> None:
    """Have pynetdicom stream every received dataset to a file in `tmp_dir` instead of memory,
    and stream files it sends from disk.

    Memory stays flat for any instance size, and the handler only renames the finished file
    into the spool (same file system: no copy). Process-wide setting: the node owns its process.
    """
    tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # multiprocessing puts its sockets in the temp dir, where a long data_dir path exceeds the
    # AF_UNIX limit: let it pick (and cache) its own folder before we redirect tempfile.
    multiprocessing.util.get_temp_dir()
    tempfile.tempdir = str(tmp_dir)
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Forwarding likewise streams a file from disk when the destination takes its syntax.
    _config.STORE_SEND_CHUNKED_DATASET = True


class PeerPolicy:
    """Who may associate: calling AE titles, and per AE the networks it may connect from."""

    def __init__(self, node: NodeConfig) -> None:
        self.allowed_aets = {ae.strip() for ae in node.allowed_calling_aets}
        self.networks = {
            ae: [ipaddress.ip_network(n, strict=False) for n in networks]
            for ae, networks in node.allowed_peers.items()
        }

    def allows(self, calling_ae: str, address: str) -> bool:
        calling_ae = calling_ae.strip()
        if self.allowed_aets and calling_ae not in self.allowed_aets:
            return False
        networks = self.networks.get(calling_ae)
        if networks is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)


class NodeAE(AE):
    """pynetdicom's AE, with the calling-AE check extended to the peer's source address and to
    the projects, and the called-AE check to every project's AE titles.

    pynetdicom rejects an association (A-ASSOCIATE-RJ, "calling AE title not recognised")
    when the calling AE is not in `require_calling_aet`, and ("called AE title not recognised")
    when the called AE differs from the acceptor's title while `require_called_aet` is set. It
    reads both in the association's own thread during negotiation, so we answer per
    association: the calling AE itself when the policy and a project allow it (else a title no
    peer can have); and the acceptor takes the called title when a project answers to it.
    """

    _REFUSED = ["\\"]  # a backslash is not allowed in an AE title: matches nobody

    def __init__(self, ae_title: str, policy: PeerPolicy, router: Router | None = None) -> None:
        super().__init__(ae_title=ae_title)
        self.policy = policy
        self.router = router

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = _negotiating()
        if assoc is None:
            return []
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        if not self.policy.allows(calling, address):
            reason = "not allowed"
        elif (
            self.router is not None
            and self.router.knows_called(called)
            and not self.router.accepts(called, calling)
        ):
            reason = "no project takes this calling AE title"
        else:
            return [calling]
        log.warning("association_refused", calling_ae=calling, peer=address, reason=reason)
        return self._REFUSED

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        self._require_calling_aet = list(ae_titles)

    @property  # type: ignore[override]
    def require_called_aet(self) -> bool:
        assoc = _negotiating()
        if assoc is None or self.router is None:
            return self._require_called_aet
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        if self.router.knows_called(called):
            # Answered as that title: the handlers read it from the acceptor to route.
            assoc.acceptor.ae_title = called
        else:
            log.warning(
                "association_refused",
                called_ae=called,
                peer=str(assoc.requestor.address),
                reason="no project answers to this called AE title",
            )
            # Any title but the called one: pynetdicom rejects, "called AE not recognised".
            assoc.acceptor.ae_title = "DEID-NODE-NONE" if called != "DEID-NODE-NONE" else "NONE"
        return True

    @require_called_aet.setter
    def require_called_aet(self, require_match: bool) -> None:
        self._require_called_aet = require_match


def _negotiating() -> Association | None:
    """The association negotiating in this thread, as an acceptor with its request read."""
    assoc = threading.current_thread()
    if not isinstance(assoc, Association) or assoc.requestor.primitive is None:
        return None
    return assoc


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
