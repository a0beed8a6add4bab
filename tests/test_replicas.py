"""Replicas (issue 18): several `deid-node serve` processes sharing one PostgreSQL and one folder.

Everything is real: a temporary PostgreSQL cluster (tests/pgcluster.py), node processes, DCMTK
storescu as the modality, Orthanc as the research PACS. Orthanc runs with its log at "verbose"
so that every C-STORE it receives is counted ("Incoming Store request"), duplicates included:
a duplicate carries the same de-identified UIDs and would only overwrite (or be "Already
stored"), so counting unique instances alone could not see it.

Issue 18's Done-when: a series split over three replicas is judged once and reaches Orthanc
once per instance; kill -9 of the replica processing it, and of the one forwarding it, is made
good by the others within lease_seconds + 10 s (the wait's bound) with at most one duplicate;
a PostgreSQL restart (and a 3 s outage) mid-transfer loses nothing acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_series, write_series
from faultpeers import KillableNode, node_raw, write_config
from peers import NODELAY_ENV, Orthanc, require, wait_until
from pgcluster import pg_restart, pg_start, pg_stop

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


def store_answers(output: str) -> list[tuple[str, str]]:
    """(SOPInstanceUID, status text) of each C-STORE response storescu -v logged, in order
    (files are named <SOPInstanceUID>.dcm); an instance without a response has none."""
    answers: list[tuple[str, str]] = []
    current: str | None = None
    for line in output.splitlines():
        if match := _SENT.search(line):
            current = Path(match.group(1)).stem
        elif (match := _ANSWER.search(line)) and current is not None:
            answers.append((current, match.group(1)))
            current = None
    return answers


def acknowledged(output: str) -> set[str]:
    """SOPInstanceUIDs storescu got Success for."""
    return {uid for uid, status in store_answers(output) if status == "Success"}


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


# -- Done when (issue 18) ------------------------------------------------------------------------


class Poll:
    """One connection to the shared database for tight polling; reconnects after a restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = None

    def rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=3, row_factory=dict_row
                )
            return self.conn.execute(sql, params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
        except psycopg.OperationalError:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
            return []

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@contextlib.contextmanager
def polling(url: str) -> Iterator[Poll]:
    poll = Poll(url)
    try:
        yield poll
    finally:
        poll.close()


def series_states(url: str, series_uid: str) -> list[str]:
    return [
        r["state"]
        for r in pg_rows(url, "SELECT state FROM batches WHERE series_uid = %s", (series_uid,))
    ]


def all_forwarded(url: str, series_uid: str) -> bool:
    states = series_states(url, series_uid)
    return bool(states) and all(s == "forwarded" for s in states)


def wait_forwarded(url: str, series_uid: str, timeout: float) -> None:
    """Every batch of the series forwarded within `timeout` (bounded; generous, as these tests
    share the machine with the rest of the suite); on timeout the failure names the batches'
    and deliveries' states."""
    try:
        wait_until(lambda: all_forwarded(url, series_uid), timeout, what="series forwarded")
    except TimeoutError as exc:
        deliveries = pg_rows(
            url,
            "SELECT d.state, count(*) AS n FROM deliveries d JOIN batches b ON b.id = d.batch_id"
            " WHERE b.series_uid = %s GROUP BY d.state",
            (series_uid,),
        )
        raise AssertionError(
            f"{exc}: batches {series_states(url, series_uid)}, deliveries "
            f"{[(r['state'], r['n']) for r in deliveries]}"
        ) from exc


def deid_uids(url: str, series_uid: str) -> dict[str, str]:
    """Original SOPInstanceUID -> de-identified one, for the series' instances."""
    rows = pg_rows(
        url, "SELECT sop_uid, sop_uid_deid FROM instances WHERE series_uid = %s", (series_uid,)
    )
    return {r["sop_uid"]: r["sop_uid_deid"] for r in rows}


def send_all_split(replicas: Replicas, files: list[Path]) -> set[str]:
    outputs = send_split(replicas.ports, split(files, len(replicas.nodes)))
    for port, output in zip(replicas.ports, outputs, strict=True):
        assert acknowledged(output), (
            f"no instance acknowledged by the replica on {port}:\n{output[-2000:]}"
        )
    return set().union(*map(acknowledged, outputs))


def test_series_split_over_three_replicas_is_judged_once(tmp_path, postgres_url):
    count = 30
    series = make_series(count, "CT")
    files = write_series(series, tmp_path / "in")
    series_uid = series[0].SeriesInstanceUID
    with counting_orthanc(tmp_path / "orthanc") as pacs:
        with running_replicas(tmp_path, 3, url=postgres_url, pacs=pacs) as replicas:
            acked = send_all_split(replicas, files)
            assert acked == {ds.SOPInstanceUID for ds in series}
            wait_forwarded(postgres_url, series_uid, 180)
            batches = pg_rows(
                postgres_url, "SELECT * FROM batches WHERE series_uid = %s", (series_uid,)
            )
            mapping = deid_uids(postgres_url, series_uid)
            arrived = orthanc_sop_uids(pacs)
            codes = replicas.stop()
        assert codes == [0, 0, 0], "a replica did not stop cleanly on SIGTERM"
    processed = series_processed(replicas.log_paths, series_uid)
    assert len(batches) == 1, f"the series was split into {len(batches)} batches"
    assert len(processed) == 1, f"the series was processed {len(processed)} times"
    assert sorted(mapping) == sorted(ds.SOPInstanceUID for ds in series)
    assert sorted(arrived) == sorted(mapping.values())
    assert orthanc_receipts(pacs) == count, "an instance reached Orthanc more than once"


def test_kill9_of_the_replica_processing_hands_the_series_over(tmp_path, postgres_url):
    count = 60
    series = make_series(count, "CT")
    files = write_series(series, tmp_path / "in")
    series_uid = series[0].SeriesInstanceUID
    with (
        counting_orthanc(tmp_path / "orthanc") as pacs,
        running_replicas(tmp_path, 3, url=postgres_url, pacs=pacs) as replicas,
        polling(postgres_url) as db,
    ):
        assert len(send_all_split(replicas, files)) == count

        def processing_holder():
            rows = db.rows(
                "SELECT * FROM batches WHERE series_uid = %s AND state = 'processing'",
                (series_uid,),
            )
            return rows and claim_holder(rows[0], replicas.ids)

        holder = wait_until(
            processing_holder, 60, interval=0.005, what="a replica processing the series"
        )
        replicas.by_id(holder).kill9()
        killed_at = time.monotonic()
        assert series_states(postgres_url, series_uid) == ["processing"], (
            "processing ended before the kill"
        )
        assert pacs.count_instances() == 0, "something left before processing finished"
        wait_until(
            lambda: all_forwarded(postgres_url, series_uid),
            LEASE_SECONDS + 10,
            interval=0.1,
            what=f"series forwarded by the others within lease_seconds + 10 s of the kill of {holder}",
        )
        took = time.monotonic() - killed_at
        mapping = deid_uids(postgres_url, series_uid)
        arrived = orthanc_sop_uids(pacs)
    print(f"processing kill: series forwarded {took:.1f} s after kill -9 of {holder}")
    assert len(mapping) == count
    assert sorted(arrived) == sorted(mapping.values()), "an instance was lost"
    assert count <= orthanc_receipts(pacs) <= count + 1, "more than one duplicate after one kill"


def test_kill9_of_the_replica_forwarding_hands_the_delivery_over(tmp_path, postgres_url):
    count = 60
    series = make_series(count, "CT")
    files = write_series(series, tmp_path / "in")
    series_uid = series[0].SeriesInstanceUID
    with (
        counting_orthanc(tmp_path / "orthanc") as pacs,
        running_replicas(tmp_path, 3, url=postgres_url, pacs=pacs) as replicas,
        polling(postgres_url) as db,
    ):
        assert len(send_all_split(replicas, files)) == count

        def forwarding_holder():
            sent = db.rows("SELECT count(*) AS n FROM sent")
            if not sent or sent[0]["n"] < 5:
                return None
            rows = db.rows(
                "SELECT d.* FROM deliveries d JOIN batches b ON b.id = d.batch_id"
                " WHERE b.series_uid = %s AND d.state = 'pending'",
                (series_uid,),
            )
            return rows and claim_holder(rows[0], replicas.ids)

        holder = wait_until(forwarding_holder, 90, interval=0.005, what="a replica forwarding")
        replicas.by_id(holder).kill9()
        killed_at = time.monotonic()
        sent_before = db.rows("SELECT count(*) AS n FROM sent")[0]["n"]
        assert sent_before < count, "forwarding ended before the kill"
        wait_until(
            lambda: all_forwarded(postgres_url, series_uid),
            LEASE_SECONDS + 10,
            interval=0.1,
            what=f"series forwarded by the others within lease_seconds + 10 s of the kill of {holder}",
        )
        took = time.monotonic() - killed_at
        mapping = deid_uids(postgres_url, series_uid)
        sent_after = db.rows("SELECT count(*) AS n FROM sent")[0]["n"]
        arrived = orthanc_sop_uids(pacs)
    print(
        f"forwarding kill at {sent_before}/{count} sent: done {took:.1f} s after kill -9 of {holder}"
    )
    assert sent_after == count
    assert sorted(arrived) == sorted(mapping.values()), "an instance was lost"
    assert count <= orthanc_receipts(pacs) <= count + 1, "more than one duplicate after one kill"


@pytest.mark.parametrize("outage", ["restart", "down_3s"])
def test_postgresql_restart_mid_transfer_loses_nothing_acknowledged(
    tmp_path, pg_cluster, postgres_url, outage
):
    """restart: pg_ctl restart -m fast while three modalities send; down_3s: the server is
    stopped for 3 s meanwhile (the replicas must refuse with 0xA700, then take instances again
    by themselves). The modalities send 10 instances an association and send refused ones
    again, as modalities do."""
    count = 240
    series = make_series(count, "CT")
    files = write_series(series, tmp_path / "in")
    series_uid = series[0].SeriesInstanceUID
    acked: set[str] = set()
    failures: list[str] = []  # status of each instance not acknowledged ("none": no answer)
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def modality(port: int, part: list[Path]) -> None:
        pending = list(part)
        while pending and time.monotonic() < deadline:
            chunk = pending[:10]
            output = subprocess.run(
                storescu_cmd(port, chunk),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # storescu -v logs to stderr
                text=True,
                timeout=60,
                env=NODELAY_ENV,
            ).stdout
            answers = dict(store_answers(output))
            got = {uid for uid, status in answers.items() if status == "Success"}
            with lock:
                acked.update(got)
                failures.extend(answers.get(f.stem, "none") for f in chunk if f.stem not in got)
            pending = [f for f in pending if f.stem not in got]
            if len(got) < len(chunk):
                time.sleep(0.2)

    with (
        counting_orthanc(tmp_path / "orthanc") as pacs,
        running_replicas(tmp_path, 3, url=postgres_url, pacs=pacs) as replicas,
        polling(postgres_url) as db,
    ):
        senders = [
            threading.Thread(target=modality, args=(port, part))
            for port, part in zip(replicas.ports, split(files, 3), strict=True)
        ]
        for t in senders:
            t.start()
        try:
            wait_until(
                lambda: (r := db.rows("SELECT count(*) AS n FROM instances")) and r[0]["n"] >= 30,
                60,
                interval=0.01,
                what="30 instances received",
            )
            if outage == "restart":
                pg_restart(pg_cluster)
            else:
                pg_stop(pg_cluster)
                time.sleep(3)
                pg_start(pg_cluster)
            with lock:
                acked_at_restart = len(acked)
        finally:
            for t in senders:
                t.join(130)
        wait_forwarded(postgres_url, series_uid, 300)
        mapping = deid_uids(postgres_url, series_uid)
        arrived = set(orthanc_sop_uids(pacs))
    print(
        f"PostgreSQL {outage} after {acked_at_restart}/{count} acknowledged;"
        f" not acknowledged then sent again: {sorted(set(failures))} x {len(failures)}"
    )
    assert acked_at_restart < count, "the transfer ended before the restart"
    missing = [uid for uid in acked if mapping.get(uid) not in arrived]
    assert not missing, f"{len(missing)} acknowledged instances never reached Orthanc"
    assert acked == {ds.SOPInstanceUID for ds in series}, (
        "the replicas did not take instances again after the restart"
    )
    if outage == "down_3s":
        assert failures, "no instance was refused while PostgreSQL was down"
        answered = {status for status in failures if status != "none"}
        assert all(status.startswith("Refused: Out") for status in answered), answered
    assert len(arrived) == count
    # A forward cut by the restart may be sent again (same UIDs): at most one per replica.
    assert count <= orthanc_receipts(pacs) <= count + 3


def test_instances_are_refused_with_a700_while_postgresql_is_down(
    tmp_path, pg_cluster, postgres_url
):
    """Issue 18: a replica answers 0xA700 while the database is unreachable (the modality
    sends again later), not silence until its own network timeout aborts the association;
    once the database is back it takes instances again by itself."""
    series = make_series(3, "CT")
    files = write_series(series, tmp_path / "in")
    series_uid = series[0].SeriesInstanceUID

    def send(port: int, chunk: list[Path]) -> str:
        return subprocess.run(
            storescu_cmd(port, chunk),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=90,
            env=NODELAY_ENV,
        ).stdout

    with (
        counting_orthanc(tmp_path / "orthanc") as pacs,
        running_replicas(tmp_path, 1, url=postgres_url, pacs=pacs, stable_seconds=1) as replicas,
    ):
        port = replicas.ports[0]
        assert acknowledged(send(port, files[:1])) == {files[0].stem}
        pg_stop(pg_cluster)
        try:
            during = send(port, files[1:])
        finally:
            pg_start(pg_cluster)
        statuses = [status for _uid, status in store_answers(during)]
        assert len(statuses) == 2 and all(s.startswith("Refused: Out") for s in statuses), (
            f"expected two 0xA700 answers while PostgreSQL was down, got {statuses}:\n"
            f"{during[-1500:]}"
        )
        # The modality sends them again: taken without a restart of the replica.
        again = wait_until(
            lambda: acknowledged(send(port, files[1:])) == {f.stem for f in files[1:]},
            60,
            interval=1,
            what="the replica taking instances again after PostgreSQL came back",
        )
        assert again
        wait_forwarded(postgres_url, series_uid, 120)
        mapping = deid_uids(postgres_url, series_uid)
        arrived = set(orthanc_sop_uids(pacs))
    assert sorted(mapping) == sorted(ds.SOPInstanceUID for ds in series)
    assert set(mapping.values()) <= arrived
