"""A real, temporary PostgreSQL cluster for the test run (issue 18's store and replicas).

`pg_cluster` (session): initdb (trust auth, superuser `deid`, UTF8) in a fresh temporary folder,
started by pg_ctl on 127.0.0.1 and a free port, as an unprivileged system user when the tests
run as root (initdb and postgres refuse root), stopped (`-m immediate`) and removed at the end
of the session, failures or not. `postgres_url` (per test): a fresh empty database
`test_<n>` in that cluster, dropped afterwards (forcibly, if a node process still holds it).

`pg_stop`, `pg_start` and `pg_restart` let a test take the server away under the node.
Without the PostgreSQL binaries the fixtures skip, except under CI=true/1, where they fail:
`make test` installs the Debian package `postgresql`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "deid"
SYSTEM_USER = "deid-pgtest"  # the unprivileged user the server runs as when the tests are root
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_DB_NUMBERS = itertools.count(1)


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _unavailable(message: str):
    """Skip, or fail under CI=true/1 where a missing PostgreSQL is a broken install."""
    if _under_ci():
        pytest.fail(f"{message}; under CI=true make test installs it", pytrace=False)
    pytest.skip(message)


def find_bindir() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: $PG_BINDIR, Debian's newest, or initdb on PATH."""
    wanted = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in wanted):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """The unprivileged user, created (no home, no login) when absent. Root only."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if not Path(useradd).exists():
        _unavailable(f"useradd is missing: cannot create the unprivileged user {name}")
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        # Another test session may have created it at the same moment (useradd exits 9).
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"useradd {name} failed ({done.returncode}): {done.stderr}") from None


@dataclass
class PgCluster:
    """One temporary cluster: where it lives, who runs it, where it listens."""

    root: Path
    bindir: Path
    port: int
    uid: int | None  # run as this user (tests running as root); None: the current user
    gid: int | None
    user_name: str
    superuser: str = SUPERUSER

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True, timeout: int = 5):
        """A psycopg connection over TCP (what the node uses), autocommit by default."""
        import psycopg

        return psycopg.connect(self.url(dbname), autocommit=autocommit, connect_timeout=timeout)

    def server_options(self) -> str:
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir}"
            " -c fsync=on -c max_connections=300"
        )

    def postmaster_pid(self) -> int | None:
        """The running server's pid (first line of postmaster.pid), or None."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError, PermissionError):
            return None

    def running(self) -> bool:
        return self._pg_ctl("status", timeout=15, check=False).returncode == 0

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def run_as_owner(
        self, args: list[str], *, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool as the cluster's owner (never as root), bounded."""
        kwargs: dict = {}
        if self.uid is not None:
            kwargs = {"user": self.uid, "group": self.gid, "extra_groups": []}
        env = {
            "PATH": f"{self.bindir}:/usr/bin:/bin",
            "LC_ALL": "C",
            "HOME": str(self.root),
            "TZ": "UTC",
        }
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} {args[1] if len(args) > 1 else ''} exited with "
                f"{done.returncode}: {done.stdout[-1000:]} {done.stderr[-1000:]}\n"
                f"server log:\n{self.log_tail()}"
            )
        return done

    def _pg_ctl(self, action: str, *extra: str, timeout: float, check: bool = True):
        return self.run_as_owner(
            [str(self.bindir / "pg_ctl"), action, "-D", str(self.data_dir), *extra],
            timeout=timeout,
            check=check,
        )


def wait_accepting(cluster: PgCluster, timeout: float = START_TIMEOUT) -> None:
    """Until a TCP connection as the superuser runs a query (bounded)."""
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with cluster.connect(timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(
        f"PostgreSQL on 127.0.0.1:{cluster.port} not accepting after {timeout} s: {last}\n"
        f"server log:\n{cluster.log_tail()}"
    )


def pg_start(cluster: PgCluster, timeout: float = START_TIMEOUT) -> None:
    """Start the (stopped) cluster and wait until it accepts connections."""
    cluster._pg_ctl(
        "start",
        "-w",
        "-t",
        str(int(timeout)),
        "-l",
        str(cluster.log_path),
        "-o",
        cluster.server_options(),
        timeout=timeout + 10,
    )
    wait_accepting(cluster, timeout)


def pg_stop(cluster: PgCluster, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
    """Stop the cluster: mode "fast" (clean), "immediate" (like a crash: recovery on start)."""
    if mode not in ("smart", "fast", "immediate"):
        raise ValueError(f"pg_ctl stop mode must be smart, fast or immediate, not {mode!r}")
    cluster._pg_ctl("stop", "-m", mode, "-w", "-t", str(int(timeout)), timeout=timeout + 10)


def pg_restart(cluster: PgCluster, timeout: float = START_TIMEOUT) -> None:
    """pg_ctl restart -m fast, then wait (bounded) until it accepts connections again."""
    cluster._pg_ctl(
        "restart",
        "-m",
        "fast",
        "-w",
        "-t",
        str(int(timeout)),
        "-l",
        str(cluster.log_path),
        "-o",
        cluster.server_options(),
        timeout=timeout + 10,
    )
    wait_accepting(cluster, timeout)


def _kill_postmaster(cluster: PgCluster) -> None:
    """Last resort at teardown when pg_ctl could not stop our server: SIGQUIT, then SIGKILL."""
    pid = cluster.postmaster_pid()
    if pid is None:
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def start_cluster(root: Path) -> PgCluster:
    """initdb in `root` (an empty folder), chowned to the unprivileged user, then start it."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
            "apt-get install postgresql, or set PG_BINDIR"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed: pip install 'psycopg[binary]' psycopg-pool")
    if os.geteuid() == 0:
        account = _ensure_system_user(SYSTEM_USER)
        uid, gid, name = account.pw_uid, account.pw_gid, account.pw_name
    else:
        uid = gid = None
        name = pwd.getpwuid(os.geteuid()).pw_name
    cluster = PgCluster(root=root, bindir=bindir, port=0, uid=uid, gid=gid, user_name=name)
    cluster.socket_dir.mkdir()
    if uid is not None:
        for path in (root, cluster.socket_dir):
            os.chown(path, uid, gid)
    os.chmod(root, 0o700)
    cluster.run_as_owner(
        [
            str(bindir / "initdb"),
            "-D",
            str(cluster.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ],
        timeout=120,
    )
    # A free port can be taken between the probe and the bind: try another one.
    for attempt in range(3):
        cluster.port = _free_port()
        try:
            pg_start(cluster)
            return cluster
        except (RuntimeError, TimeoutError):
            with contextlib.suppress(Exception):
                pg_stop(cluster, "immediate")
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop_cluster(cluster: PgCluster) -> None:
    """Stop our server (immediate: its data are thrown away) and remove its folder."""
    try:
        if cluster.postmaster_pid() is not None:
            pg_stop(cluster, "immediate")
    except (RuntimeError, subprocess.TimeoutExpired):
        _kill_postmaster(cluster)
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A temporary PostgreSQL cluster for the whole test session."""
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, the server user cannot enter it.
    # In the system's temporary folder by name: tempfile's default is process-wide, and a node
    # run in-process by an earlier test points it into its own private data folder, which the
    # server's unprivileged user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="deid-pgtest-", dir=os.environ.get("TMPDIR") or "/tmp"))
    try:
        cluster = start_cluster(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def create_database(cluster: PgCluster, name: str) -> str:
    with cluster.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.url(name)


def drop_database(cluster: PgCluster, name: str, timeout: float = 60.0) -> None:
    """DROP DATABASE ... WITH (FORCE): a node process still connected is cut off. Bounded."""
    import psycopg

    if not cluster.running():
        pg_start(cluster)  # a test that stopped the server and failed before starting it again
    deadline = time.monotonic() + timeout
    while True:
        try:
            with cluster.connect() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.OperationalError:
            # "being accessed by other users" when a backend outlives FORCE's wait; or a restart.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def postgres_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database in the session's cluster: postgresql://deid@127.0.0.1:PORT/test_<n>."""
    name = f"test_{next(_DB_NUMBERS)}"
    url = create_database(pg_cluster, name)
    try:
        yield url
    finally:
        drop_database(pg_cluster, name)
