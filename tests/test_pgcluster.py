"""The PostgreSQL test harness itself (tests/pgcluster.py): isolation, durability, privileges."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pgcluster import (
    PgCluster,
    _unavailable,
    create_database,
    drop_database,
    pg_restart,
    pg_start,
    pg_stop,
)

SEEN_DATABASES: list[str] = []


def _user_tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_empty_database(postgres_url, run):
    import psycopg

    name = postgres_url.rsplit("/", 1)[1]
    assert postgres_url.startswith("postgresql://deid@127.0.0.1:")
    assert name.startswith("test_")
    assert name not in SEEN_DATABASES, "two tests were given the same database"
    assert _user_tables(postgres_url) == [], "the database of a new test is not empty"
    # Leave something behind: the next run must not see it.
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE left_behind (n integer)")
    SEEN_DATABASES.append(name)


def test_committed_rows_survive_a_restart(pg_cluster: PgCluster, postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE kept (n integer PRIMARY KEY)")
        conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
    before = pg_cluster.postmaster_pid()
    held = psycopg.connect(postgres_url, autocommit=True, connect_timeout=5)
    try:
        pg_restart(pg_cluster)
        assert pg_cluster.postmaster_pid() not in (None, before), "the server was not restarted"
        # A connection from before the restart is gone, as a node's pooled ones will be.
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT count(*), sum(n) FROM kept").fetchone() == (100, 5050)


def test_stop_refuses_connections_until_start(pg_cluster: PgCluster, postgres_url):
    import psycopg

    pg_stop(pg_cluster)
    try:
        assert not pg_cluster.running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres_url, connect_timeout=2)
    finally:
        pg_start(pg_cluster)
    assert pg_cluster.running()
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_runs_as_an_unprivileged_user(pg_cluster: PgCluster):
    pid = pg_cluster.postmaster_pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uids = [
        int(u) for u in next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1:]
    ]
    expected = os.geteuid() if pg_cluster.uid is None else pg_cluster.uid
    assert uids == [expected] * 4, f"postmaster runs with uids {uids}, expected {expected}"
    assert 0 not in uids, "the PostgreSQL server runs as root"
    with pg_cluster.connect() as conn:
        data_dir = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
        assert conn.execute("SELECT current_user").fetchone() == ("deid",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
    assert Path(data_dir) == pg_cluster.data_dir
    assert Path(data_dir).stat().st_uid == expected


def _listening(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_cluster_listens_on_loopback_only(pg_cluster: PgCluster):
    with pg_cluster.connect() as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert str(conn.execute("SELECT inet_server_addr()").fetchone()[0]) == "127.0.0.1"
    assert _listening(pg_cluster.port) == {"127.0.0.1"}


def test_drop_cuts_off_a_connection_left_open(pg_cluster: PgCluster):
    """What the postgres_url teardown relies on when a node process still holds the database."""
    import psycopg

    url = create_database(pg_cluster, "test_held_open")
    held = psycopg.connect(url, autocommit=True, connect_timeout=5)
    try:
        drop_database(pg_cluster, "test_held_open", timeout=30)
        with pg_cluster.connect() as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
        assert "test_held_open" not in names
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()


def test_missing_postgresql_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _unavailable("no initdb")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception):
            _unavailable("no initdb")
