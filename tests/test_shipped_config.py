"""`make run`: the shipped config starts a node that DCMTK can echo and store to, with its
console, and Ctrl-C stops it cleanly. The config is the shipped file with its two ports (11112,
8080) moved to free ones: another node on this machine (a second checkout's test run) must
not answer in its place."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dicomgen import make_series, write_series
from peers import NODELAY_ENV, REPO, echoscu, free_port, storescu, wait_for_port

pytestmark = [pytest.mark.network]


def shipped_config_on_free_ports(folder: Path) -> tuple[Path, int, int]:
    """The shipped config, its DICOM and console ports (and nothing else) replaced."""
    text = (REPO / "config" / "deid-node.toml").read_text()
    dicom, console = free_port(), free_port()
    for shipped, free in (("port = 11112\n", dicom), ("port = 8080\n", console)):
        assert text.count(shipped) == 1, shipped
        text = text.replace(shipped, f"port = {free}\n")
    config = folder / "deid-node.toml"
    config.write_text(text)
    return config, dicom, console


def test_shipped_config_serves_and_stops_on_ctrl_c(tmp_path):
    config, port, console_port = shipped_config_on_free_ports(tmp_path)
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deid_node.cli", "serve", "--config", str(config)],
        cwd=tmp_path,  # data_dir = "var" resolves here
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**NODELAY_ENV, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for_port(port, 60, proc)
        assert echoscu(port).returncode == 0
        paths = write_series(make_series(2, "CT"), tmp_path / "in")
        assert storescu(port, paths).returncode == 0
        assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 2
        # The shipped console: /healthz answers on 127.0.0.1 (no users yet: no login).
        health = httpx.get(f"http://127.0.0.1:{console_port}/healthz", timeout=20)
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
