import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The `easyocr` marker: skipped without the extra, a failure under CI=true (tests/extras.py).
from extras import pytest_configure, pytest_runtest_setup  # noqa: E402, F401

# PostgreSQL for the store and replica tests: a temporary cluster per session (tests/pgcluster.py).
from pgcluster import pg_cluster, postgres_url  # noqa: E402, F401


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request):
    """Store(folder, **options) on the back end of the test's parameter (SQLite, or the
    session's temporary PostgreSQL cluster); closes what it made. `make.backend` names the
    back end, `make.url` is the PostgreSQL URL (None on SQLite)."""
    from deid_node.store import Store

    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    made: list[Store] = []

    def make(folder: Path, **options) -> Store:
        if url:
            options = {"database_url": url, "replica_id": "r1", **options}
        made.append(Store(folder, **options))
        return made[-1]

    make.backend = request.param
    make.url = url
    yield make
    for store in made:
        store.close()
