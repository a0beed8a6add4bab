"""The C-STORE/C-ECHO SCP: pynetdicom wiring and event handlers only.

Handlers take an event and return a DIMSE status; no exception escapes into the association.
Success (0x0000) is returned only after the instance's bytes are fsynced in the spool and its
row is committed in SQLite. The bytes are stored exactly as the modality sent them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import multiprocessing.util
import shutil
import sqlite3
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_node.config import NodeConfig, TlsConfig
from deid_node.log import get_logger
from deid_node.pipeline import UID_PATTERN
from deid_node.store import Receipt, Store

log = get_logger("deid_node.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class StoreLimits:
    max_instance_bytes: int
    min_free_disk_bytes: int


def build_ae(node: NodeConfig) -> AE:
    ae = NodeAE(node.ae_title, PeerPolicy(node))
    # Every storage SOP class with every transfer syntax pynetdicom knows: we store bytes as
    # sent, so a compressed syntax costs nothing here.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    ae.network_timeout = node.network_timeout_seconds
    ae.acse_timeout = ae.dimse_timeout = node.network_timeout_seconds
    ae.maximum_associations = 32
    return ae


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def make_store_handler(store: Store, limits: StoreLimits) -> Callable[[evt.Event], int]:
    def handle_store(event: evt.Event) -> int:
        calling_ae = _calling_ae(event)
        bound = log.bind(calling_ae=calling_ae, sop_uid=str(event.request.AffectedSOPInstanceUID))
        try:
            return _store_instance(event, store, limits, calling_ae, bound)
        except (OSError, sqlite3.OperationalError) as exc:
            bound.error(
                "store_failed", reason="disk or database error", error_type=type(exc).__name__
            )
            return OUT_OF_RESOURCES
        except Exception as exc:  # never let an exception reach the association
            bound.error("store_failed", reason="unexpected error", error_type=type(exc).__name__)
            return PROCESSING_FAILURE

    return handle_store


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


def _received_file(event: evt.Event, store: Store) -> Path:
    """The received instance as a file in Part 10 format (ours to move or delete)."""
    try:
        path = event.dataset_path  # None unless in chunked mode
    except AttributeError:
        path = None
    if path is not None:
        return Path(path)
    return store.tmp_write(event.encoded_dataset(include_meta=True))


def _store_instance(
    event: evt.Event,
    store: Store,
    limits: StoreLimits,
    calling_ae: str,
    bound: Any,
) -> int:
    if shutil.disk_usage(store.data_dir).free < limits.min_free_disk_bytes:
        bound.warning("store_refused", reason="free disk below node.min_free_disk_mb")
        return OUT_OF_RESOURCES
    try:
        received = _received_file(event, store)
    except Exception as exc:
        bound.warning(
            "store_refused", reason="cannot read received dataset", error_type=type(exc).__name__
        )
        return CANNOT_UNDERSTAND
    try:
        return _accept_file(event, store, limits, calling_ae, bound, received)
    finally:
        received.unlink(missing_ok=True)  # moved into the spool or quarantine, or refused


def _accept_file(
    event: evt.Event,
    store: Store,
    limits: StoreLimits,
    calling_ae: str,
    bound: Any,
    received: Path,
) -> int:
    request = event.request
    peer = str(event.assoc.requestor.address)

    def refuse(status: int, reason: str, keep: bool = True, **fields: Any) -> int:
        quarantined = store.quarantine_file(received) if keep else None
        store.record_refused(
            sop_uid=str(request.AffectedSOPInstanceUID),
            sop_class_uid=str(request.AffectedSOPClassUID),
            calling_ae=calling_ae,
            peer=peer,
            status=status,
            reason=reason,
            quarantine_path=quarantined,
        )
        bound.warning("store_refused", reason=reason, status=f"0x{status:04X}", **fields)
        return status

    size = received.stat().st_size
    if size > limits.max_instance_bytes:
        return refuse(
            OUT_OF_RESOURCES, "instance larger than node.max_instance_mb", keep=False, size=size
        )
    try:
        header = dcmread(received, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        uids = {tag: str(header.get(tag, "") or "") for tag in _HEADER_TAGS}
        syntax = str(header.file_meta.TransferSyntaxUID)
    except Exception as exc:
        return refuse(CANNOT_UNDERSTAND, "dataset cannot be parsed", error_type=type(exc).__name__)
    missing = [
        tag for tag in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if not uids[tag]
    ]
    if missing:
        return refuse(CANNOT_UNDERSTAND, f"missing {', '.join(missing)}")
    if not all(UID_PATTERN.match(uids[tag]) for tag in _HEADER_TAGS if uids[tag]):
        return refuse(CANNOT_UNDERSTAND, "malformed UID in dataset")
    if uids["SOPInstanceUID"] != str(request.AffectedSOPInstanceUID) or (
        uids["SOPClassUID"] and uids["SOPClassUID"] != str(request.AffectedSOPClassUID)
    ):
        return refuse(DATASET_MISMATCH, "dataset UIDs differ from the C-STORE request")
    digest = file_sha256(received)
    path = store.spool_adopt(received)
    receipt = Receipt(
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=str(request.AffectedSOPClassUID),
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax=syntax,
        calling_ae=calling_ae,
        peer=peer,
        sha256=digest,
    )
    try:
        stored = store.record_instance(receipt, path, size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    bound.debug(
        "instance_stored",
        series_uid=receipt.series_uid,
        batch_id=stored.batch_id,
        duplicate=stored.duplicate,
    )
    return SUCCESS


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _calling_ae(event: evt.Event) -> str:
    return ae_title_text(event.assoc.requestor.ae_title)


def ae_title_text(title: object) -> str:
    """An AE title as text, whether pynetdicom gives bytes or str."""
    return (title.decode(errors="replace") if isinstance(title, bytes) else str(title)).strip()


def handle_association_event(event: evt.Event) -> None:
    log.info(
        event.event.name.lower(),
        calling_ae=_calling_ae(event),
        peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
    )


def handlers(store: Store, limits: StoreLimits) -> list[tuple[Any, Callable[..., Any]]]:
    return [
        (evt.EVT_C_STORE, make_store_handler(store, limits)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, handle_association_event),
        (evt.EVT_REJECTED, handle_association_event),
        (evt.EVT_ABORTED, handle_association_event),
    ]


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
    """pynetdicom's AE, with the calling-AE check extended to the peer's source address.

    pynetdicom rejects an association (A-ASSOCIATE-RJ, "calling AE title not recognised")
    when the calling AE is not in `require_calling_aet`. It reads that list in the association's
    own thread during negotiation, so we answer per association: the calling AE itself when
    the policy allows it from this address, or a title no peer can have.
    """

    _REFUSED = ["\\"]  # a backslash is not allowed in an AE title: matches nobody

    def __init__(self, ae_title: str, policy: PeerPolicy) -> None:
        super().__init__(ae_title=ae_title)
        self.policy = policy
        # Set when the node stops: new associations are rejected while those in progress
        # finish (closing the listening socket first would cut them off).
        self.stopping = False

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association) or assoc.requestor.primitive is None:
            return []
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.stopping:
            log.info(
                "association_refused", calling_ae=calling, peer=address, reason="node stopping"
            )
            return self._REFUSED
        if self.policy.allows(calling, address):
            return [calling]
        log.warning("association_refused", calling_ae=calling, peer=address, reason="not allowed")
        return self._REFUSED

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        self._require_calling_aet = list(ae_titles)


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
