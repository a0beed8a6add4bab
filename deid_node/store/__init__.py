"""The node's persistent state in `data_dir`: the SQLite database and the files it points to.

The only package that writes the database. Every write happens in one short transaction under
one lock (SQLite serialises writers anyway); WAL with synchronous=FULL makes a committed row
durable before the SCP answers Success. Other modules call named functions, never SQL.

- schema.py: batch states and the numbered migrations;
- lock.py: one process owns a data folder (flock, taken before anything is touched);
- base.py: opening the database, transactions, queries, paths relative to data_dir;
- spool.py: received bytes (tmp/, spool/) and their clean-up;
- quarantine.py: kept originals and the rows of refused instances;
- reports.py: per-file reports and status;
- receiving.py: received instances, the batches they open, associations holding them, stable
  batches made complete;
- state.py: `Store`, and the state transitions of complete batches (processing, results,
  failures, retries, recovery);
- deliveries.py: deliveries to destinations, what each acknowledged or refused;
- pulls.py: pull jobs (`deid-node pull`), their input lines and studies;
- engine.py: SQLite or PostgreSQL under it (the same SQL, translated);
- replicas.py: replicas sharing PostgreSQL: heartbeats, leases on claimed work, holds.
"""

from typing import Any

from deid_node.store.receiving import Receipt, StoredInstance
from deid_node.store.schema import BATCH_STATES, FINAL_STATES, utcnow
from deid_node.store.state import Store


def open_store(config: Any, **options: Any) -> Store:
    """The Store a config names: SQLite in node.data_dir, or the PostgreSQL database and the
    shared folder of `[store]` (as replica node.replica_id). options: readonly, exclusive."""
    if config.store.backend == "postgresql":
        store = Store(
            config.store.shared_dir,
            database_url=config.store.url,
            replica_id=config.node.replica_id,
            **options,
        )
        store.lease_seconds = config.store.lease_seconds
        return store
    return Store(config.node.data_dir, **options)


def open_existing_store(config: Any, **options: Any) -> Store:
    """open_store for the tools next to a node (status, retry, reports, pull): an error, not
    a new empty database, when the node never ran with this config."""
    from deid_node.errors import DeidNodeError

    if config.store.backend == "sqlite" and not config.db_path.exists():
        raise DeidNodeError(f"no database at {config.db_path}: has the node run with this config?")
    return open_store(config, **options)


__all__ = [
    "BATCH_STATES",
    "FINAL_STATES",
    "Receipt",
    "Store",
    "StoredInstance",
    "open_existing_store",
    "open_store",
    "utcnow",
]
