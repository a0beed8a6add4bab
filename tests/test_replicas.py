"""Replicas (issue 18): several `deid-node serve` processes sharing one PostgreSQL and one folder.

Everything is real: a temporary PostgreSQL cluster (tests/pgcluster.py), node processes, DCMTK
storescu as the modality, Orthanc as the research PACS. Orthanc runs with its log at "verbose"
so that every C-STORE it receives is counted ("Incoming Store request"), duplicates included:
a duplicate carries the same de-identified UIDs and would only overwrite (or be "Already
stored"), so counting unique instances alone could not see it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from faultpeers import KillableNode, node_raw, write_config
from peers import NODELAY_ENV, Orthanc, require

pytestmark = [pytest.mark.network, pytest.mark.slow]

LEASE_SECONDS = 5
CALLING_AE = "MODALITY"


# -- configuration ------------------------------------------------------------------------------


def replica_id(index: int) -> str:
    return f"node-{index}"


def orthanc_destination(pacs: Orthanc) -> dict[str, Any]:
    return {
        "name": "research",
        "type": "dicom",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1,
        "timeout_seconds": 5,
    }


def replica_raw(
    index: int,
    workdir: Path,
    *,
    url: str,
    pacs: Orthanc,
    lease_seconds: int = LEASE_SECONDS,
    mode: str = "REDACT_NO_TEXT",
    stable_seconds: float = 2,
    **node: Any,
) -> dict[str, Any]:
    """Replica `index`'s config: its own port and local data_dir, the shared database and folder
    (`workdir/shared`), one Orthanc destination. The [store] keys are issue 18's."""
    raw = node_raw(
        workdir / replica_id(index),
        [orthanc_destination(pacs)],
        mode=mode,
        stable_seconds=stable_seconds,
        replica_id=replica_id(index),
        workers=1,  # three replicas on two shared cores
        **node,
    )
    raw["store"] = {
        "backend": "postgresql",
        "url": url,
        "shared_dir": str(workdir / "shared"),
        "lease_seconds": lease_seconds,
    }
    return raw


def write_replica_config(index: int, workdir: Path, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
    raw = replica_raw(index, workdir, **kwargs)
    return write_config(workdir / f"{replica_id(index)}.toml", raw), raw


# -- the replicas as processes ----------------------------------------------------------------


class Replicas:
    """N `deid-node serve` processes, started together; stop() stops those still running."""

    def __init__(self, workdir: Path, count: int, **kwargs: Any) -> None:
        self.workdir = workdir
        self.nodes: list[KillableNode] = []
        self.raws: list[dict[str, Any]] = []
        for index in range(count):
            path, raw = write_replica_config(index, workdir, **kwargs)
            self.raws.append(raw)
            self.nodes.append(
                KillableNode(path, raw["node"]["port"], workdir / f"{replica_id(index)}.log")
            )

    @property
    def ids(self) -> list[str]:
        return [replica_id(i) for i in range(len(self.nodes))]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def log_paths(self) -> list[Path]:
        return [node.log_path for node in self.nodes]

    def start(self, timeout: float = 90.0) -> Replicas:
        # In parallel: each start is mostly imports, and the port wait is bounded per node.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start, timeout) for node in self.nodes]:
                future.result()
        return self

    def by_id(self, rid: str) -> KillableNode:
        return self.nodes[self.ids.index(rid)]

    def stop(self) -> list[int | None]:
        """SIGTERM each replica still running (a killed one is left as it is); exit codes."""
        codes: list[int | None] = []
        for node in self.nodes:
            if node.proc is not None and node.alive():
                codes.append(node.stop())
            else:
                codes.append(None)
        return codes


@contextlib.contextmanager
def running_replicas(workdir: Path, count: int, **kwargs: Any) -> Iterator[Replicas]:
    """Start `count` replicas; at the end stop the ones still running (and only those)."""
    replicas = Replicas(workdir, count, **kwargs)
    try:
        yield replicas.start()
    finally:
        replicas.stop()
        for node in replicas.nodes:
            # A start that failed half-way leaves a process without a port: never leave it.
            if node.proc is not None and node.proc.poll() is None:
                node.kill9()


# -- Orthanc that counts every C-STORE it receives -------------------------------------------


@contextlib.contextmanager
def counting_orthanc(workdir: Path) -> Iterator[Orthanc]:
    """A real Orthanc whose log records each incoming C-STORE (log level "verbose")."""
    pacs = Orthanc(workdir).start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{pacs.http_port}/tools/log-level", data=b"verbose", method="PUT"
        )
        urllib.request.urlopen(request, timeout=10).close()
        yield pacs
    finally:
        pacs.stop()


def orthanc_receipts(pacs: Orthanc) -> int:
    """C-STORE requests Orthanc received (duplicates included). Read after pacs.stop()."""
    text = (pacs.workdir / "orthanc.log").read_text(errors="replace")
    return text.count("Incoming Store request")


def orthanc_sop_uids(pacs: Orthanc) -> list[str]:
    """SOPInstanceUIDs of the instances Orthanc holds (each once: Orthanc keys by it)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand")]


# -- the shared database, read from the test -------------------------------------------------


def pg_rows(url: str, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    """Rows as dicts; [] while the schema does not exist yet or the server is restarting."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        with psycopg.connect(url, connect_timeout=3, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return []


def claim_holder(row: dict[str, Any], ids: list[str]) -> str | None:
    """The replica holding a batch's or a delivery's claim (`claimed_by`), if one of ours."""
    holder = row.get("claimed_by")
    return holder if holder in ids else None


# -- the modality ------------------------------------------------------------------------------


def storescu_cmd(port: int, files: list[Path]) -> list[str]:
    # -v: one "Sending file" / "Received Store Response" pair per instance; -nh: go on after a
    # refused instance (0xA700 while the database is away), as a modality retrying later would.
    return [
        require("storescu"),
        "-v",
        "-nh",
        "-aet",
        CALLING_AE,
        "-aec",
        "DEID_NODE",
        "-to",
        "20",
        "-ta",
        "20",
        "-td",
        "20",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]


def send_split(ports: list[int], parts: list[list[Path]], timeout: float = 120) -> list[str]:
    """storescu to each port with its part, all associations at once; each one's output."""
    senders = [
        subprocess.Popen(
            storescu_cmd(port, files),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=NODELAY_ENV,
        )
        for port, files in zip(ports, parts, strict=True)
    ]
    outputs: list[str] = [""] * len(senders)

    def collect(index: int) -> None:
        outputs[index] = senders[index].communicate(timeout=timeout)[0]

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(senders))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 10)
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
                sender.wait(timeout=10)
    return outputs


_SENT = re.compile(r"Sending file: (\S+)")
_ANSWER = re.compile(r"Received Store Response \(([^)]*)\)")


def acknowledged(output: str) -> set[str]:
    """SOPInstanceUIDs storescu got Success for (files are named <SOPInstanceUID>.dcm)."""
    acked: set[str] = set()
    current: str | None = None
    for line in output.splitlines():
        if match := _SENT.search(line):
            current = Path(match.group(1)).stem
        elif (match := _ANSWER.search(line)) and current is not None:
            if match.group(1) == "Success":
                acked.add(current)
            current = None
    return acked


def split(files: list[Path], parts: int) -> list[list[Path]]:
    """Interleaved, so every association carries instances from the whole series."""
    return [files[i::parts] for i in range(parts)]


# -- the node logs -------------------------------------------------------------------------------


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    events = []
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                events.append(record)
    return events


def series_processed(log_paths: list[Path], series_uid: str) -> list[dict[str, Any]]:
    """Every `series_processed` line about `series_uid`, over all the replicas' logs."""
    return [
        record
        for path in log_paths
        for record in log_events(path, "series_processed")
        if record.get("series_uid") == series_uid
    ]
