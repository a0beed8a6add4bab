"""`make run`: the shipped config starts a node on 11112 that DCMTK can echo and store to,
and Ctrl-C stops it cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest
from dicomgen import make_series, write_series
from peers import NODELAY_ENV, REPO, echoscu, storescu, wait_for_port

pytestmark = [pytest.mark.network]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_shipped_config_serves_and_stops_on_ctrl_c(tmp_path):
    if port_in_use(11112):
        pytest.skip("port 11112 is taken on this machine")
    if port_in_use(8080):
        pytest.skip("port 8080 (the shipped console.port) is taken on this machine")
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deid_node.cli",
            "serve",
            "--config",
            str(REPO / "config" / "deid-node.toml"),
        ],
        cwd=tmp_path,  # data_dir = "var" resolves here
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**NODELAY_ENV, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for_port(11112, 60, proc)
        assert echoscu(11112).returncode == 0
        paths = write_series(make_series(2, "CT"), tmp_path / "in")
        assert storescu(11112, paths).returncode == 0
        assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 2
        # The shipped console: /healthz answers on 127.0.0.1:8080 (no users yet: no login).
        health = httpx.get("http://127.0.0.1:8080/healthz", timeout=20)
        assert health.status_code == 200 and health.json()["ok"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0
    text = (tmp_path / "node.log").read_text()
    assert '"event": "node_started"' in text and '"event": "node_stopped"' in text
    assert "Traceback" not in text
