"""Send de-identified series to their destinations: C-STORE SCU or a folder.

One association per series and destination (never one per file). Each acknowledged instance is
recorded by the caller at once, so a retry after a partial failure sends only what is missing.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from deid_node.config import DestinationConfig
from deid_node.errors import ForwardError
from deid_node.files import fsync_tree, write_durably

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Outgoing:
    instance_id: int
    path: Path
    sop_uid: str  # de-identified SOPInstanceUID
    study_uid: str
    series_uid: str


def backoff_seconds(dest: DestinationConfig, attempts: int) -> float:
    """Exponential backoff after `attempts` failed attempts, capped."""
    return min(dest.backoff_max_seconds, dest.backoff_initial_seconds * (2 ** max(0, attempts - 1)))


def send_batch(
    dest: DestinationConfig,
    items: Sequence[Outgoing],
    on_stored: Callable[[Outgoing, str, int], None],
) -> None:
    """Send every item; call on_stored(item, url_deid, status) for each one stored.

    Raises ForwardError when the association fails (refused, aborted, timed out) or after the
    series when any instance was refused; what was stored stays recorded.
    """
    if dest.type == "folder":
        _copy_to_folder(dest, items, on_stored)
    else:
        _c_store(dest, items, on_stored)


def _copy_to_folder(
    dest: DestinationConfig,
    items: Sequence[Outgoing],
    on_stored: Callable[[Outgoing, str, int], None],
) -> None:
    assert dest.path is not None
    copied: list[tuple[Outgoing, Path]] = []
    try:
        for item in items:
            folder = dest.path / item.study_uid / item.series_uid
            final = folder / f"{item.sop_uid}.dcm"
            folder.mkdir(parents=True, exist_ok=True)
            with item.path.open("rb") as src:
                write_durably(
                    folder / f".{item.sop_uid}.part",
                    final,
                    lambda dst, src=src: shutil.copyfileobj(src, dst),
                    sync_dir=False,
                )
            copied.append((item, final))
        # One fsync per folder makes the renames durable; only then are the files "sent".
        fsync_tree((final for _, final in copied), dest.path)
    except OSError as exc:
        raise ForwardError(
            f"cannot write to folder destination {dest.name}: {exc.strerror}"
        ) from None
    for item, final in copied:
        on_stored(item, str(final), 0)


def client_ssl_context(dest: DestinationConfig) -> ssl.SSLContext:
    """Verify the destination against tls_ca (hostname or IP in its certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_cert and dest.tls_key:
        context.load_cert_chain(dest.tls_cert, dest.tls_key)
    return context


def _check_reachable(dest: DestinationConfig) -> None:
    """Fail fast, with the reason, when nothing listens (pynetdicom would only say 'aborted')."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.timeout_seconds):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ForwardError(
            f"{dest.name}: cannot connect to {dest.host}:{dest.port}: {reason}"
        ) from None


def _c_store(
    dest: DestinationConfig,
    items: Sequence[Outgoing],
    on_stored: Callable[[Outgoing, str, int], None],
) -> None:
    _check_reachable(dest)
    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    ae.connection_timeout = dest.timeout_seconds
    # One context per (SOP class, transfer syntax) as stored, so that a file can be streamed
    # as it is (a compressed one must be); for uncompressed files also a context with the other
    # uncompressed syntax, for a destination that takes only that one.
    pairs: dict[Outgoing, tuple[str, str]] = {}
    for item in items:
        meta = dcmread(item.path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        pairs[item] = (str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    proposals: set[tuple[str, str]] = set(pairs.values())
    for sop_class, syntax in list(proposals):
        if syntax in _UNCOMPRESSED:
            proposals |= {(sop_class, other) for other in _UNCOMPRESSED}
    if len(proposals) > 127:
        raise ForwardError(f"{dest.name}: more than 127 presentation contexts for one series")
    for sop_class, syntax in sorted(proposals):
        ae.add_requested_context(sop_class, [syntax])
    tls_args = (client_ssl_context(dest), dest.host) if dest.tls_ca else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = (
            "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no association"
        )
        raise ForwardError(
            f"{dest.name}: association {reason} by {dest.ae_title}@{dest.host}:{dest.port}"
        )
    refused: list[int] = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        for item in items:
            # As stored when the destination took its syntax: pynetdicom streams the file (the
            # node enables chunked sending). Otherwise decoded, and re-encoded by pynetdicom in
            # an uncompressed syntax the destination accepted.
            payload = item.path if pairs[item] in accepted else dcmread(item.path)
            status = assoc.send_c_store(payload)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise ForwardError(f"{dest.name}: no response to C-STORE (timeout or abort)")
            if code not in _STORED:
                # Keep offering the others: one instance the destination refuses must not hold
                # back the rest of the series (it is retried with the delivery).
                refused.append(code)
                continue
            on_stored(item, f"dicom://{dest.ae_title}@{dest.host}:{dest.port}/{item.sop_uid}", code)
        if refused:
            codes = ", ".join(sorted({f"0x{c:04X}" for c in refused}))
            raise ForwardError(
                f"{dest.name}: {len(refused)} instance(s) refused with status {codes}"
            )
    finally:
        if assoc.is_established:
            assoc.release()
