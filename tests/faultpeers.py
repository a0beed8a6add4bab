"""Misbehaving peers for the reliability tests: a storage SCP with per-instance faults, a raw
C-STORE sender, the node as a process that can be SIGKILLed, and read-only views of its state.

Every wait is bounded; only processes started here are signalled, by their own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import NodeProcess, free_port
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# C-STORE statuses a destination may answer that mean "stored" (PS3.4 B.2.3).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class Received:
    """One C-STORE the fault SCP answered: the SOP Instance UID and the status it returned."""

    sop_uid: str
    status: int
    transfer_syntax: str = ""  # of the presentation context it arrived on
    dataset: Any = None  # the decoded dataset, when the SCP keeps them (keep_datasets)


@dataclass
class FaultySCP:
    """A pynetdicom storage SCP on a free loopback port, run in this process.

    status_for(n, sop_uid) picks the status of the n-th C-STORE (1-based, over the SCP's life);
    delay holds every answer for that many seconds; hang never answers (until stop());
    abort_on lists C-STORE numbers on which the SCP aborts the association instead;
    transfer_syntaxes and sop_classes (None: all storage classes) restrict what it accepts.
    """

    ae_title: str = "RESEARCH"
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    hang: bool = False
    status_for: Callable[[int, str], int] | None = None
    abort_on: frozenset[int] = frozenset()
    ssl_context: ssl.SSLContext | None = None
    transfer_syntaxes: list[str] = field(default_factory=lambda: list(ALL_TRANSFER_SYNTAXES))
    sop_classes: frozenset[str] | None = None
    keep_datasets: bool = False
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._calls = 0
        self._server: Any = None

    def start(self) -> FaultySCP:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            if self.sop_classes is None or context.abstract_syntax in self.sop_classes:
                ae.add_supported_context(context.abstract_syntax, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.maximum_associations = 16
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
        self._release.clear()
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        return self

    def stop(self) -> None:
        self._release.set()  # frees a hung or delayed handler at once
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> FaultySCP:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _on_store(self, event: evt.Event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self._calls += 1
            number = self._calls
        if number in self.abort_on:
            event.assoc.abort()
            return 0xA700
        if self.hang:
            self._release.wait(300)
            return 0xA700
        if self.delay:
            self._release.wait(self.delay)
        status = self.status_for(number, sop_uid) if self.status_for else 0x0000
        syntax = str(event.context.transfer_syntax)
        dataset = event.dataset if self.keep_datasets else None
        with self._lock:
            self.received.append(Received(sop_uid, status, syntax, dataset))
        return status

    # What the archive holds: instances answered with a "stored" status.
    def stored(self) -> list[str]:
        with self._lock:
            return [r.sop_uid for r in self.received if r.status in STORED]

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls


@contextlib.contextmanager
def chunked_send() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes exactly as they are on disk (no re-encoding)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_raw(
    port: int,
    paths: list[Path],
    *,
    called: str = "DEID_NODE",
    calling: str = "MODALITY",
    timeout: float = 20.0,
) -> list[int | None]:
    """C-STORE each file's bytes as they are, on the context its file meta names.

    Returns one status per file (None: no response, e.g. the association was aborted).
    A new association is opened when the previous one was lost.
    """
    statuses: list[int | None] = []
    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(*pair)
    assoc = None
    with chunked_send():
        try:
            for path in paths:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", port, ae_title=called)
                    if not assoc.is_established:
                        statuses.append(None)
                        assoc = None
                        continue
                try:
                    rsp = assoc.send_c_store(path)
                except (ValueError, AttributeError, RuntimeError):
                    statuses.append(None)
                    continue
                statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
    return statuses


def associate(
    port: int,
    *,
    called: str = "DEID_NODE",
    calling: str = "MODALITY",
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Any:
    """Open an association requesting Verification and CT storage (caller releases it)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    tls_args = (tls, "localhost") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


# -- the node as a process ----------------------------------------------------------------------


class KillableNode(NodeProcess):
    """`deid-node serve` that can be SIGKILLed together with its worker processes."""

    def kill9(self) -> None:
        """SIGKILL the node, then the worker processes it had started (left orphaned)."""
        assert self.proc is not None
        children = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _children_by_parent() -> dict[int, list[int]]:
    """Each process's children, from /proc (a process that exits meanwhile is left out)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    return parents


def children(pid: int) -> set[int]:
    """The processes `pid` started that are alive (from /proc)."""
    return set(_children_by_parent().get(pid, []))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), deepest last."""
    parents = _children_by_parent()
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# -- read-only views of the node's state ---------------------------------------------------------


def db_rows(db_path: Path, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    """Query the node's SQLite database read-only (safe while the node runs or after a kill)."""
    if not db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.OperationalError:
        return []  # not migrated yet
    finally:
        conn.close()


def toml_text(raw: dict[str, Any]) -> str:
    """Write a config dict as TOML: tables, sub-tables, arrays of tables, inline tables."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines: list[str] = []
    for section, body in raw.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {value(v)}" for k, v in entry.items()]
            continue
        lines.append(f"[{section}]")
        subtables = {k: v for k, v in body.items() if isinstance(v, dict) and k == "tls"}
        lines += [f"{k} = {value(v)}" for k, v in body.items() if k not in subtables]
        for name, sub in subtables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def node_raw(
    data_dir: Path, destinations: list[dict[str, Any]], *, mode: str = "REDACT_NO_TEXT", **node: Any
) -> dict[str, Any]:
    """A node config for the reliability tests: loopback, free port, fast polling."""
    stable = node.pop("stable_seconds", 1)
    return {
        "node": {
            "ae_title": "DEID_NODE",
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(data_dir),
            "min_free_disk_mb": 1,
            "poll_seconds": 0.2,
            "workers": 2,
            # Bounds how long a stop waits for an association in progress: short in tests.
            "network_timeout_seconds": 5,
            **node,
        },
        "series": {"stable_seconds": stable},
        "deid": {"redact_pixels_mode": mode},
        "save_conditions": [{"type": "NOT_SUBSTR", "value": "PRIMARY", "dicom_tag": "ImageType"}],
        "destinations": destinations,
    }


def dicom_destination(scp: FaultySCP, **extra: Any) -> dict[str, Any]:
    return {
        "name": "research",
        "type": "dicom",
        "ae_title": scp.ae_title,
        "host": "127.0.0.1",
        "port": scp.port,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1,
        "timeout_seconds": 5,
        **extra,
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(toml_text(raw))
    return path
