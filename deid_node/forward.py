"""Send de-identified series to their destinations: C-STORE SCU, a folder, or DICOMweb
STOW-RS (deid_node/forward_dicomweb.py, same per-instance contract).

One association per series and destination (never one per file). Each instance is on its own:
acknowledged ones are recorded by the caller at once (a retry sends only what is missing), one
the destination refuses for good (a status retrying cannot change, no presentation context for
it even uncompressed) is reported and not offered again, and a transient refusal or a lost
association fails the attempt, which the caller retries with backoff. While a destination is
down, `DestinationLink` asks it C-ECHO on a short capped backoff so that delivery resumes as
soon as it answers.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_node.config import DestinationConfig
from deid_node.deid.pixelsize import declared_decoded_bytes
from deid_node.errors import DestinationUnreachableError, ForwardError
from deid_node.files import fsync_tree, write_durably

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# Refusals that the same bytes sent again cannot change (PS3.4 B.2.3, PS3.7 C): the data set
# does not match the SOP class (A9xx), cannot understand (Cxxx), SOP class not supported,
# invalid SOP instance, not authorized. Everything else (A7xx out of resources, 0110
# processing failure, unknown codes) is treated as transient and retried with backoff.
_PERMANENT_CODES = {0x0117, 0x0122, 0x0124}
# Proposed for every SOP class of a series, whatever its files' syntax: the destination may
# take only these, and a compressed file is then decompressed for it.
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# First pause between C-ECHO probes of a destination that is down (doubles up to the cap).
PROBE_INITIAL_SECONDS = 0.5
# A probe that takes longer than this counts as "still down" (a dropped SYN waits otherwise).
PROBE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Outgoing:
    instance_id: int
    path: Path
    sop_uid: str  # de-identified SOPInstanceUID
    study_uid: str
    series_uid: str


# on_stored(item, url_deid, status); on_refused(item, status or None, reason): for good.
OnStored = Callable[[Outgoing, str, int], None]
OnRefused = Callable[[Outgoing, "int | None", str], None]


def backoff_seconds(dest: DestinationConfig, attempts: int) -> float:
    """Exponential backoff after `attempts` failed attempts, capped."""
    return min(dest.backoff_max_seconds, dest.backoff_initial_seconds * (2 ** max(0, attempts - 1)))


def is_permanent(status: int) -> bool:
    """A failure status that no retry of the same instance can turn into a success."""
    return (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000 or status in _PERMANENT_CODES


def send_batch(
    dest: DestinationConfig,
    items: Sequence[Outgoing],
    on_stored: OnStored,
    on_refused: OnRefused,
    *,
    max_decoded_bytes: int | None = None,
) -> None:
    """Send every item; on_stored for each one stored, on_refused for each refused for good.

    Returns when every item was stored or refused for good. Raises DestinationUnreachableError
    when no association could be opened (no connection, aborted while opening), and
    ForwardError when it was rejected, lost during the series (abort, DIMSE timeout) or an
    instance was refused with a transient status;
    what was stored or refused stays recorded. max_decoded_bytes bounds the size of a
    compressed instance decompressed for a destination that takes only uncompressed syntaxes.
    """
    if dest.type == "folder":
        _copy_to_folder(dest, items, on_stored)
    elif dest.type == "dicomweb":
        from deid_node.forward_dicomweb import stow  # it imports this module's types

        stow(dest, items, on_stored, on_refused)
    else:
        _c_store(dest, items, on_stored, on_refused, max_decoded_bytes)


def _copy_to_folder(
    dest: DestinationConfig, items: Sequence[Outgoing], on_stored: OnStored
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


def _check_reachable(dest: DestinationConfig, timeout: float) -> None:
    """Fail fast, with the reason, when nothing listens (pynetdicom would only say 'aborted')."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DestinationUnreachableError(
            f"{dest.name}: cannot connect to {dest.host}:{dest.port}: {reason}"
        ) from None


def _application_entity(dest: DestinationConfig, timeout: float) -> AE:
    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(dest: DestinationConfig, ae: AE) -> object:
    tls_args = (client_ssl_context(dest), dest.host) if dest.tls_ca else None
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)


def _c_store(
    dest: DestinationConfig,
    items: Sequence[Outgoing],
    on_stored: OnStored,
    on_refused: OnRefused,
    max_decoded_bytes: int | None,
) -> None:
    _check_reachable(dest, dest.timeout_seconds)
    ae = _application_entity(dest, dest.timeout_seconds)
    # One context per (SOP class, transfer syntax) as stored, so that a file can be streamed
    # as it is (a compressed one must be), and for every SOP class the two uncompressed
    # syntaxes, for a destination that takes only those.
    pairs: dict[Outgoing, tuple[str, str]] = {}
    for item in items:
        meta = dcmread(item.path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        pairs[item] = (str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    proposals = set(pairs.values())
    proposals |= {(sop_class, str(s)) for sop_class, _ in pairs.values() for s in _UNCOMPRESSED}
    if len(proposals) > 127:
        raise ForwardError(f"{dest.name}: more than 127 presentation contexts for one series")
    for sop_class, syntax in sorted(proposals):
        ae.add_requested_context(sop_class, [syntax])
    assoc = _associate(dest, ae)
    if not assoc.is_established:
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        if assoc.is_rejected:  # it answered: up, but unwilling (AE title, limits)
            raise ForwardError(f"{dest.name}: association rejected by {where}")
        reason = "aborted" if assoc.is_aborted else "no association"
        raise DestinationUnreachableError(f"{dest.name}: association {reason} by {where}")
    transient: list[int] = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        for item in items:
            try:
                payload = _payload(item, pairs[item], accepted, max_decoded_bytes)
            except ForwardError as exc:
                on_refused(item, None, str(exc))
                continue
            try:
                status = assoc.send_c_store(payload)
            except (RuntimeError, ValueError, AttributeError) as exc:
                if not assoc.is_established:  # pynetdicom raises when the association went away
                    raise ForwardError(
                        f"{dest.name}: association lost during C-STORE ({type(exc).__name__})"
                    ) from None
                # Still up: this dataset could not be encoded for the context; sending it
                # again would fail the same way.
                on_refused(item, None, f"cannot encode for the context ({type(exc).__name__})")
                continue
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                # Transient, but not "down": it took the association (and would answer a
                # C-ECHO), so the retry waits out the backoff rather than the probe.
                raise ForwardError(f"{dest.name}: no response to C-STORE (timeout or abort)")
            if code in _STORED:
                url = f"dicom://{dest.ae_title}@{dest.host}:{dest.port}/{item.sop_uid}"
                on_stored(item, url, code)
            elif is_permanent(code):
                on_refused(item, code, f"status 0x{code:04X}")
            else:
                # Keep offering the others: one instance the destination refuses must not hold
                # back the rest of the series (it is retried with the delivery).
                transient.append(code)
        if transient:
            codes = ", ".join(sorted({f"0x{c:04X}" for c in transient}))
            raise ForwardError(
                f"{dest.name}: {len(transient)} instance(s) refused with status {codes}"
            )
    finally:
        if assoc.is_established:
            assoc.release()


def _payload(
    item: Outgoing,
    pair: tuple[str, str],
    accepted: set[tuple[str, str]],
    max_decoded_bytes: int | None,
) -> Path | Dataset:
    """What to send for one file: the file as stored when the destination took its syntax
    (pynetdicom streams it, the node enables chunked sending); otherwise the dataset, which
    pynetdicom re-encodes in an accepted uncompressed syntax, decompressed first if need be.
    Raises ForwardError (a refusal for good) when no accepted context can carry it."""
    sop_class, syntax = pair
    if pair in accepted:
        return item.path
    uncompressed = [s for s in _UNCOMPRESSED if (sop_class, s) in accepted]
    name = UID(sop_class).name
    if not uncompressed:
        raise _no_context(name, syntax)
    if UID(syntax) in _UNCOMPRESSED:
        return dcmread(item.path)
    ds = dcmread(item.path)
    if "PixelData" not in ds:
        # Nothing encapsulated (a deflated SR, say): the data set itself is re-encoded.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    decoded = declared_decoded_bytes(ds)
    if decoded is None:
        raise ForwardError(
            f"{item.sop_uid}: cannot decompress {UID(syntax).name}: pixel data without valid"
            " Rows, Columns, SamplesPerPixel, BitsAllocated or NumberOfFrames"
        )
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise ForwardError(
            f"{item.sop_uid}: would be {decoded / 2**20:.1f} MiB decompressed, over the"
            f" {max_decoded_bytes / 2**20:.1f} MiB limit"
        )
    try:
        # The de-identified UIDs stay: the instance is the same, only its encoding changes.
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise ForwardError(
            f"{item.sop_uid}: cannot decompress {UID(syntax).name} ({type(exc).__name__})"
        ) from None
    return ds


def _no_context(sop_class_name: str, syntax: str) -> ForwardError:
    return ForwardError(
        f"no accepted presentation context for {sop_class_name} in {UID(syntax).name}"
        " or an uncompressed syntax"
    )


def echo(dest: DestinationConfig, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether the destination answers DICOM now: an association accepted (C-ECHO sent if it
    took Verification) or rejected (it answered, it is up). Never raises for a peer's fault.
    A DICOMweb destination is up when its base URL answers HTTP at all."""
    if dest.type == "dicomweb":
        from deid_node.forward_dicomweb import probe

        return probe(dest, timeout)
    try:
        _check_reachable(dest, timeout)
    except DestinationUnreachableError:
        return False
    ae = _application_entity(dest, timeout)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(dest, ae)
    except (OSError, ssl.SSLError, RuntimeError, ValueError):
        return False
    if not assoc.is_established:
        return bool(assoc.is_rejected)
    try:
        if any(c.abstract_syntax == Verification for c in assoc.accepted_contexts):
            assoc.send_c_echo()
    except (RuntimeError, ValueError):
        pass  # it took the association: up, whatever became of the C-ECHO
    finally:
        if assoc.is_established:
            assoc.release()
    return True


class DestinationLink:
    """Whether one destination is up, and when to probe it while it is down (forwarder thread
    only): C-ECHO after 0.5 s, then doubling up to probe_max_seconds."""

    def __init__(self, dest: DestinationConfig) -> None:
        self.dest = dest
        self.down_since: float | None = None
        self._pause = PROBE_INITIAL_SECONDS
        self._next_probe = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._pause = PROBE_INITIAL_SECONDS
            self._next_probe = self.down_since + self._pause

    def mark_up(self) -> None:
        self.down_since = None

    def seconds_until_probe(self) -> float | None:
        return max(0.0, self._next_probe - time.monotonic()) if self.down else None

    def probe(self) -> bool:
        """C-ECHO it if a probe is due; True when it answered (now up)."""
        if not self.down or time.monotonic() < self._next_probe:
            return False
        if echo(self.dest, min(PROBE_TIMEOUT_SECONDS, self.dest.timeout_seconds)):
            self.mark_up()
            return True
        self._pause = min(self.dest.probe_max_seconds, self._pause * 2)
        self._next_probe = time.monotonic() + self._pause
        return False
