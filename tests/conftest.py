import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The `easyocr` marker: skipped without the extra, a failure under CI=true (tests/extras.py).
from extras import pytest_configure, pytest_runtest_setup  # noqa: E402, F401

# PostgreSQL for the store and replica tests: a temporary cluster per session (tests/pgcluster.py).
from pgcluster import pg_cluster, postgres_url  # noqa: E402, F401
