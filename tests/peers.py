"""Real network peers for tests: free ports, DCMTK tools, Orthanc, the node as a process.

Every wait is bounded; every process started here is stopped here (and only those).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (make test installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def storescu(
    port: int,
    files: list[Path],
    *,
    called: str = "DEID_NODE",
    calling: str = "MODALITY",
    timeout: float = 60.0,
) -> subprocess.CompletedProcess:
    cmd = [
        require("storescu"),
        "-aet",
        calling,
        "-aec",
        called,
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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=NODELAY_ENV)


def echoscu(
    port: int, *, called: str = "DEID_NODE", calling: str = "ECHOSCU", timeout: float = 30.0
):
    cmd = [
        require("echoscu"),
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "10",
        "-ta",
        "10",
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=NODELAY_ENV)


class Orthanc:
    """A real Orthanc on loopback with its own temporary config and storage."""

    def __init__(
        self, workdir: Path, aet: str = "RESEARCH_PACS", extra_config: dict | None = None
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.extra_config = extra_config or {}  # e.g. AcceptedTransferSyntaxes
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = require("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "deid-node-test",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "StableAge": 1,
            **self.extra_config,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (self.workdir / "orthanc.log").open("w")
        self.proc = subprocess.Popen(
            [binary, str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=NODELAY_ENV,
            cwd=self.workdir,
        )
        wait_for_port(self.http_port, 30, self.proc)
        wait_for_port(self.dicom_port, 30, self.proc)
        return self

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if path != "/" and not path.endswith("/file") else body

    def instances(self) -> list[str]:
        return self.get("/instances")

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.log.close()


class NodeProcess:
    """`deid-node serve` as a real process, on a config written for the test."""

    def __init__(
        self, config_path: Path, port: int, log_path: Path, log_level: str = "info"
    ) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deid_node.cli",
                "--log-level",
                self.log_level,
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=NODELAY_ENV,
        )
        wait_for_port(self.port, timeout, self.proc)
        return self

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=60) if self.proc else 0
        self.log.close()
        return code


@contextlib.contextmanager
def orthanc(workdir: Path) -> Iterator[Orthanc]:
    server = Orthanc(workdir).start()
    try:
        yield server
    finally:
        server.stop()
