"""Measure what idle and oversized connections do to a node (issue 13, items 3 and 4).

Starts `deid-node serve` from a source tree (this checkout, or an older one extracted with
`git archive <commit> | tar -x -C DIR`) with network_timeout_seconds = 60, and prints:
- with 40 TCP connections that send nothing: DCMTK echoscu's and storescu's exit codes;
- an A-ASSOCIATE-RQ declaring 4 GiB, streamed for up to 256 MiB: what the node accepted and
  its RSS before and after;
- SIGTERM with 30 idle connections open: seconds to exit;
- on a TLS node with one idle TCP connection: whether a TLS association is established.
A measurement, not a test (docs/reliability.md holds the figures):

    .venv/bin/python scripts/idle_connections.py [--tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]

from dicomgen import make_series, write_series  # noqa: E402
from faultpeers import associate, node_raw, write_config  # noqa: E402
from peers import NODELAY_ENV, echoscu, storescu, wait_for_port  # noqa: E402


def serve(tree: Path, work: Path, **node: object) -> tuple[subprocess.Popen, int]:
    work.mkdir(parents=True, exist_ok=True)
    raw = node_raw(work / "data", [{"name": "out", "type": "folder", "path": str(work / "out")}])
    raw["node"].update({"network_timeout_seconds": 60, **node})
    config = write_config(work / "node.toml", raw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deid_node.cli", "serve", "--config", str(config)],
        cwd=tree,
        env={**NODELAY_ENV, "PYTHONPATH": str(tree)},
        stdout=(work / "node.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(raw["node"]["port"], 60, proc)
    return proc, raw["node"]["port"]


def rss_mib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) // 1024


def idle(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def plain(tree: Path, work: Path) -> None:
    proc, port = serve(tree, work)
    socks = idle(port, 40)
    time.sleep(2)
    echo = echoscu(port)
    limit = "Local Limit Exceeded" in echo.stdout + echo.stderr
    print(f"40 idle: echoscu exit {echo.returncode}" + (" (Local Limit Exceeded)" if limit else ""))
    stored = storescu(port, write_series(make_series(2), work / "in"))
    print(f"40 idle: storescu exit {stored.returncode}")
    for sock in socks:
        sock.close()
    before, sent, started = rss_mib(proc.pid), 0, time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(bytes([1, 0]) + (0xFFFFFFF0).to_bytes(4, "big"))
            while sent < 256 << 20 and time.monotonic() - started < 60:
                sock.sendall(b"\0" * (1 << 20))
                sent += 1 << 20
        print(
            f"4 GiB A-ASSOCIATE-RQ: {sent >> 20} MiB accepted; RSS {before} -> {rss_mib(proc.pid)} MiB"
        )
    socks = idle(port, 30)
    time.sleep(1)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
        print(f"SIGTERM, 30 idle: exit {proc.returncode} after {time.monotonic() - started:.1f} s")
    except subprocess.TimeoutExpired:
        print("SIGTERM, 30 idle: still running after 120 s")
        proc.kill()
        proc.wait()
    for sock in socks:
        sock.close()


def tls(tree: Path, work: Path) -> None:
    from test_reliability_security import client_context, make_pki

    pki = make_pki(work / "pki")
    files = {
        "cert": str(pki["server_pem"]),
        "key": str(pki["server_key"]),
        "ca": str(pki["ca_pem"]),
    }
    proc, port = serve(tree, work, tls=files)
    sock = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.5)
    started = time.monotonic()
    assoc = associate(port, tls=client_context(pki), timeout=15)
    took = time.monotonic() - started
    print(f"TLS, 1 idle connection: association established={assoc.is_established} ({took:.1f} s)")
    if assoc.is_established:
        assoc.release()
    sock.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain(args.tree.resolve(), Path(tmp) / "plain")
        tls(args.tree.resolve(), Path(tmp) / "tls")


if __name__ == "__main__":
    main()
