"""The SCP's event handlers: each takes an event and returns a DIMSE status.

No exception escapes into the association. Success (0x0000) is returned only after the
instance's bytes are fsynced in the spool and its row is committed in SQLite. The bytes are
stored exactly as the modality sent them. Where it is safe (`Store.overlapped_receipt`), the
file's fsync runs while the row commits: Success still waits for both.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import evt

from deid_node.log import get_logger
from deid_node.modes import DEFAULT_PROJECT
from deid_node.pipeline import UID_PATTERN
from deid_node.routing import Router
from deid_node.scp.limits import PIXEL_TAGS, pixel_size_problem
from deid_node.store import Receipt, Store, StoredInstance
from deid_node.store.engine import StoreUnavailableError
from deid_node.store.spool import file_sha256

log = get_logger("deid_node.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


# Values above this many bytes are skipped, not read, when the SCP reads a header.
_DEFER_BYTES = 4096


@dataclass(frozen=True)
class StoreLimits:
    max_instance_bytes: int
    min_free_disk_bytes: int
    max_decoded_bytes: int = 0  # 0: no limit


@dataclass(frozen=True)
class Routes:
    """Where received instances go: the router's projects by the association's AE titles and
    their match rules; `only`: the projects of the pull job whose C-GET this is. No router:
    everything to the implicit default project."""

    router: Router | None = None
    only: tuple[str, ...] | None = None

    def tags(self) -> list[Any]:
        return self.router.match_tags() if self.router else []

    def projects(self, event: evt.Event, header: Any, calling_ae: str) -> list[str]:
        if self.router is None:
            return [DEFAULT_PROJECT]
        return self.router.route(
            header,
            called_ae=ae_title_text(event.assoc.acceptor.ae_title),
            calling_ae=calling_ae,
            only=self.only,
        )


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def make_store_handler(
    store: Store, limits: StoreLimits, routes: Routes | None = None
) -> Callable[[evt.Event], int]:
    routes = routes or Routes()

    def handle_store(event: evt.Event) -> int:
        calling_ae = _calling_ae(event)
        bound = log.bind(calling_ae=calling_ae, sop_uid=str(event.request.AffectedSOPInstanceUID))
        try:
            return _store_instance(event, store, limits, routes, calling_ae, bound)
        except (OSError, sqlite3.OperationalError, StoreUnavailableError) as exc:
            bound.error(
                "store_failed", reason="disk or database error", error_type=type(exc).__name__
            )
            return OUT_OF_RESOURCES
        except Exception as exc:  # never let an exception reach the association
            bound.error("store_failed", reason="unexpected error", error_type=type(exc).__name__)
            return PROCESSING_FAILURE

    return handle_store


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
    routes: Routes,
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
        return _accept_file(event, store, limits, routes, calling_ae, bound, received)
    finally:
        received.unlink(missing_ok=True)  # moved into the spool or quarantine, or refused


def _accept_file(
    event: evt.Event,
    store: Store,
    limits: StoreLimits,
    routes: Routes,
    calling_ae: str,
    bound: Any,
    received: Path,
) -> int:
    request = event.request
    peer = str(_remote(event).address)

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
        # Pixel Data and other large values are skipped (deferred), not read.
        header = dcmread(
            received,
            defer_size=_DEFER_BYTES,
            specific_tags=_HEADER_TAGS + PIXEL_TAGS + routes.tags(),
        )
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
    problem = pixel_size_problem(header, size, limits.max_decoded_bytes)
    if problem is not None:
        # A decoded-size refusal is retried by modalities (0xA7xx): one copy kept is enough.
        keep = problem.status != OUT_OF_RESOURCES or not store.refused_copy_kept(
            str(request.AffectedSOPInstanceUID)
        )
        return refuse(problem.status, problem.reason, keep=keep, **problem.fields)
    projects = routes.projects(event, header, calling_ae)
    receipt = Receipt(
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=str(request.AffectedSOPClassUID),
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax=syntax,
        calling_ae=calling_ae,
        peer=peer,
    )
    stored = _record_durably(store, receipt, received, size, event.assoc, projects)
    bound.debug(
        "instance_stored",
        series_uid=receipt.series_uid,
        batch_id=stored.batch_id,
        duplicate=stored.duplicate,
        projects=projects,
    )
    if not projects:
        bound.info("instance_unrouted", series_uid=receipt.series_uid)
    return SUCCESS


def _record_durably(
    store: Store,
    receipt: Receipt,
    received: Path,
    size: int,
    association: Any,
    projects: list[str],
) -> StoredInstance:
    """The file in the spool and its row (with the file's SHA-256), both durable when this
    returns (and not before).

    One row (one project, or unrouted) of an instance new to its series: the file's fsync runs
    in another thread while this one hashes the file and commits the row, two disk flushes at
    once (issue 17: the commit was a third of the handler). Otherwise (fan-out into hard
    links, a re-send that replaces or drops a copy, PostgreSQL): the file is fsynced, then the
    row committed."""
    if len(projects) <= 1:
        with store.overlapped_receipt(received, receipt.series_uid, receipt.sop_uid) as path:
            if path is not None:
                flushing = store.flush_spool_file(path)
                try:
                    receipt = replace(receipt, sha256=file_sha256(path))
                    stored = store.record_instance(
                        receipt, path, size, association=association, projects=projects
                    )
                except BaseException:
                    flushing.wait()
                    path.unlink(missing_ok=True)
                    raise
        if path is not None:
            # An fsync error raises here (0xA700, no Success); the row stays marked, and the
            # next start drops it unless its file is whole.
            flushing.result()
            store.receipt_confirmed(path)
            return stored
    receipt = replace(receipt, sha256=file_sha256(received))
    path = store.spool_adopt(received)
    try:
        return store.record_instance(
            receipt, path, size, association=association, projects=projects
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _remote(event: evt.Event) -> Any:
    """The peer's side of the association: the requestor when a modality sends to us, the
    acceptor on a C-GET the node itself requested (the PACS sends the instances back)."""
    assoc = event.assoc
    return assoc.acceptor if assoc.is_requestor else assoc.requestor


def _calling_ae(event: evt.Event) -> str:
    """The AE title of the peer that sent the instances (on a C-GET, the PACS's)."""
    return ae_title_text(_remote(event).ae_title)


def ae_title_text(title: object) -> str:
    """An AE title as text, whether pynetdicom gives bytes or str."""
    return (title.decode(errors="replace") if isinstance(title, bytes) else str(title)).strip()


def handle_association_event(event: evt.Event) -> None:
    log.info(
        event.event.name.lower(),
        calling_ae=_calling_ae(event),
        peer=f"{_remote(event).address}:{_remote(event).port}",
    )


def make_close_handler(store: Store) -> Callable[[evt.Event], None]:
    """Released, aborted or connection closed: the series this association fed may now
    become stable (stable_seconds counts from here)."""

    def handle_close(event: evt.Event) -> None:
        try:
            store.association_closed(event.assoc)
        except Exception as exc:  # never let an exception reach the association
            log.error("association_close_failed", error_type=type(exc).__name__)

    return handle_close


def handlers(
    store: Store, limits: StoreLimits, routes: Routes | None = None
) -> list[tuple[Any, Callable[..., Any]]]:
    on_close = make_close_handler(store)
    return [
        (evt.EVT_RELEASED, on_close),
        (evt.EVT_ABORTED, on_close),
        (evt.EVT_CONN_CLOSE, on_close),
        (evt.EVT_C_STORE, make_store_handler(store, limits, routes)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, handle_association_event),
        (evt.EVT_REJECTED, handle_association_event),
        (evt.EVT_ABORTED, handle_association_event),
    ]
