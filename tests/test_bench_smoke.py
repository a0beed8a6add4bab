"""Smoke run of scripts/bench.py at tiny sizes, so that the benchmark cannot rot.

No thresholds: it must finish and write a table with every phase. Peers that need the
benchmark's own venv (dicognito, dcmanon) and easyocr's model load are left out for speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from peers import NODELAY_ENV, REPO, require

pytestmark = [pytest.mark.slow, pytest.mark.network]

PHASES = ("Ingest", "Concurrency", "Pipeline", "OCR", "GPU", "End-to-end", "Big series")


def test_bench_quick_run_writes_a_table_with_every_phase(tmp_path):
    require("storescu")
    require("storescp")
    out = tmp_path / "benchmarks.md"
    # Its own session, so that a timeout stops the bench and every process it started.
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--instances", "3",
         "--no-peer-venv", "--no-install", "--no-orthanc", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=NODELAY_ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        pytest.fail("bench.py --quick did not finish in 120 s")
    assert proc.returncode == 0, stderr[-2000:]
    text = out.read_text()
    assert "| Phase | Measure | Result |" in text
    table_phases = {
        line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")
    }
    for phase in PHASES:
        assert phase in table_phases, f"phase {phase} missing from the table"
    for measure in (
        "bare pynetdicom SCP",
        "polling as the node does",
        "deid-node --workers 2, 3 files",
        "deid-node --workers 2, 8 files",  # the second size (3,000 in a full run)
        "start-up: deid-node",
        "ms per file by stage",
        "rapidocr",
        "whole cine vs one frame",
        "last ack",
    ):
        assert measure in text, f"{measure} missing from the table"
    # Issue 17's targets are printed next to their figures, met or not.
    for target in (">= 2x", ">= 0.8x", "<= 300 ms"):
        assert f"| {target} |" in text, f"target {target} missing"
    assert "Machine:" in text and "Python" in text
