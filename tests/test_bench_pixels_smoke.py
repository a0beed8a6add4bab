"""scripts/bench_pixels.py at tiny size: it runs, measures every mode and writes its table."""

from __future__ import annotations

import subprocess
import sys

import pytest
from peers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ocr]


def test_bench_pixels_quick_run_writes_a_table(tmp_path):
    out = tmp_path / "bench-pixels.md"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_pixels.py"),
            "--quick",
            "--engines",
            "rapidocr",
            "--write",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    for mode in ("ALL", "SENSITIVE"):
        assert mode in text
    assert "rapidocr" in text and "%" in text
