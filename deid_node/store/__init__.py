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
- state.py: `Store`, the state transitions of instances, batches and deliveries;
- pulls.py: pull jobs (`deid-node pull`), their input lines and studies.
"""

from deid_node.store.schema import BATCH_STATES, FINAL_STATES, utcnow
from deid_node.store.state import Receipt, Store, StoredInstance

__all__ = ["BATCH_STATES", "FINAL_STATES", "Receipt", "Store", "StoredInstance", "utcnow"]
