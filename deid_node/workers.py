"""The worker processes that de-identify files: the pool, and one outcome per job even when a
worker dies.

It knows nothing of DICOM or of what a job is, and imports nothing of ours but to warm a worker
up: the pipeline hands it a picklable function, the jobs and how to spell a failed outcome; the
node, the batch CLI and the API start the pool.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")


def make_process_pool(workers: int, *, start_method: str = "forkserver") -> Executor:
    """Worker processes for deidentify_file, started now (each imports what it needs at once,
    so that the first series does not wait for them).

    forkserver (the node): workers never inherit the node's threads, sockets or SQLite handle.
    fork (the batch front door, a single-threaded process): workers start from the parent's
    memory with everything already imported.
    """
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context(start_method)
    )
    for _ in range(workers):
        pool.submit(_warm_up)
    return pool


def pool_is_broken(executor: Executor | None) -> bool:
    """Whether a worker process died under this pool, so that every later submit would raise
    BrokenProcessPool. ProcessPoolExecutor has no public flag: its private `_broken` is read
    here only (tests/test_workers.py fails if a Python upgrade removes it)."""
    return bool(getattr(executor, "_broken", False))


def replace_pool(
    executor: Executor, *, workers: int | None = None, start_method: str = "forkserver"
) -> Executor:
    """A new pool for a broken one: the old one is shut down without waiting (what was queued on
    it cancelled), the new one has `workers` processes (default: as many as the old one)."""
    executor.shutdown(wait=False, cancel_futures=True)
    if workers is None:
        workers = int(getattr(executor, "_max_workers", 1) or 1)
    return make_process_pool(workers, start_method=start_method)


def _warm_up() -> None:
    # What deidentify_file needs, before the first file: the pipeline (it quiets pydicom's
    # logging in the worker), pydicom and the profile tables.
    import deid_node.deid.tags  # noqa: F401
    import deid_node.pipeline  # noqa: F401


def map_jobs(
    fn: Callable[[Job], Outcome],
    jobs: list[Job],
    executor: Executor | None,
    failed: Callable[[str], Outcome],
) -> Iterator[Outcome]:
    """`fn` of each job, in order; on `executor` when there is one. A job whose worker fails
    gets `failed(reason)`, the reason without values."""
    if executor is None:
        return iter([fn(job) for job in jobs])
    # Even a single file goes to the pool: the node's own process must not hold a large
    # instance in memory (one 1 GiB multi-frame would cost it 2 GiB for its whole life).
    # One future per file: a worker that dies (a decoder crash, the kernel's OOM killer) fails
    # the files it had, with a reason, instead of raising out of the series.
    futures: list[Future | None] = []
    for job in jobs:
        try:
            futures.append(executor.submit(fn, job))
        except BrokenProcessPool:
            futures.append(None)  # broken before this file: it runs alone below
    return _outcomes(fn, jobs, futures, failed)


def _outcomes(
    fn: Callable[[Job], Outcome],
    jobs: list[Job],
    futures: list[Future | None],
    failed: Callable[[str], Outcome],
) -> Iterator[Outcome]:
    """Each file's outcome. A worker that dies breaks the whole shared pool: every file in
    flight, of every series, fails with BrokenProcessPool, though at most one caused it. Those
    files run again one at a time in a pool of their own, so that only a file that kills that
    worker too is failed; the others (and their series) are processed as if nothing happened.
    The caller replaces the broken shared pool."""
    alone: Executor | None = None
    try:
        for job, future in zip(jobs, futures, strict=True):
            if future is not None:
                try:
                    yield future.result()
                    continue
                except BrokenProcessPool:
                    pass
                except Exception as exc:  # noqa: BLE001 - pickling errors...
                    yield failed(_worker_failed(exc))
                    continue
            alone = alone or make_process_pool(1)
            try:
                yield alone.submit(fn, job).result()
            except BrokenProcessPool:
                alone.shutdown(wait=False, cancel_futures=True)
                alone = None
                yield failed("worker process died on this file (crash or memory)")
            except Exception as exc:  # noqa: BLE001
                yield failed(_worker_failed(exc))
    finally:
        if alone is not None:
            alone.shutdown(wait=False)


def _worker_failed(exc: Exception) -> str:
    return f"worker process failed: {type(exc).__name__}"
