"""The worker processes that de-identify files: the pool, and one outcome per job even when a
worker dies.

It knows nothing of DICOM or of what a job is, and imports nothing of ours but to warm a worker
up: the pipeline hands it a picklable function, the jobs and how to spell a failed outcome; the
node, the batch CLI and the API start the pool.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
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
    if isinstance(executor, RenewablePool):
        executor = executor.executor
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


class RenewablePool(Executor):
    """A process pool that a dead worker does not shrink: `renew()` puts a fresh pool with as
    many workers, started the same way, in place of a broken one. The batch front door (CLI and
    API) holds one for a run; the node replaces its shared pool itself (replace_pool)."""

    def __init__(self, workers: int, *, start_method: str = "forkserver") -> None:
        self.workers = workers
        self.start_method = start_method
        self.executor = make_process_pool(workers, start_method=start_method)

    def submit(self, fn: Callable[..., Outcome], /, *args: object, **kwargs: object) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def renew(self) -> None:
        self.executor = replace_pool(
            self.executor, workers=self.workers, start_method=self.start_method
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)


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


AHEAD_PER_WORKER = 32
_NO_JOB = object()


def map_jobs_renewing(
    fn: Callable[[Job], Outcome],
    jobs: Iterable[Job],
    pool: RenewablePool | None,
    failed: Callable[[str], Outcome],
    *,
    window: int | None = None,
    ahead: int | None = None,
) -> Iterator[Outcome]:
    """`fn` of each job, in order, on `pool` (inline without one), for a run that owns its pool
    (the batch). At most `window` jobs (default: twice the workers, and one) are submitted and
    not finished, and at most `ahead` (default: AHEAD_PER_WORKER per worker) are submitted and
    not yet yielded: a run of 100,000 files holds a few futures, not 100,000, and a slow file
    stops the other workers only once they are `ahead` files past it.

    A worker that dies breaks the pool, and every job not finished fails with it though at most
    one caused it: those run again one at a time in a pool of their own, so that only a job
    that kills that worker too gets `failed(reason)`, and the rest of the run goes on in a fresh
    pool with as many workers (`pool.renew()`), not one file at a time."""
    if pool is None:
        for job in jobs:
            yield fn(job)
        return
    window = max(1, window or 2 * pool.workers + 1)
    ahead = max(window, ahead or AHEAD_PER_WORKER * pool.workers)
    todo = iter(jobs)
    more = True
    submitted: deque[tuple[Job, Future]] = deque()  # in order, until yielded
    unfinished: set[Future] = set()
    while more or submitted:
        while more and len(unfinished) < window and len(submitted) < ahead:
            job = next(todo, _NO_JOB)
            if job is _NO_JOB:
                more = False
                break
            future = _submit(pool, fn, job)
            submitted.append((job, future))
            unfinished.add(future)
        if not submitted:
            break
        finished = {f for f in unfinished if f.done()}
        if not finished and not submitted[0][1].done():
            finished, _ = wait(unfinished, return_when=FIRST_COMPLETED)
        unfinished -= finished
        if any(_died(f) for f in finished):
            yield from _outcomes_after_death(fn, submitted, pool, failed)
            unfinished.clear()
            continue
        while submitted and submitted[0][1].done() and not _died(submitted[0][1]):
            _, future = submitted.popleft()
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001 - pickling errors...
                yield failed(_worker_failed(exc))


def _submit(pool: Executor, fn: Callable[[Job], Outcome], job: Job) -> Future:
    try:
        return pool.submit(fn, job)
    except BrokenProcessPool as exc:  # broken before this job: it is in flight with the others
        future: Future = Future()
        future.set_exception(exc)
        return future


def _died(future: Future) -> bool:
    """Whether this finished future failed because its pool broke."""
    return not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)


def _outcomes_after_death(
    fn: Callable[[Job], Outcome],
    submitted: deque[tuple[Job, Future]],
    pool: RenewablePool,
    failed: Callable[[str], Outcome],
) -> Iterator[Outcome]:
    """The outcomes of every job submitted to a pool that broke, in order: those done before
    the break as they are, the others run again alone (`_outcomes`). The pool is renewed once
    every future of the broken one is settled: renewing it cancels what is still pending."""
    taken = list(submitted)
    submitted.clear()
    wait([f for _, f in taken])
    pool.renew()
    yield from _outcomes(
        fn,
        [job for job, _ in taken],
        [None if _died(f) else f for _, f in taken],
        failed,
        start_method=pool.start_method,
    )


def _outcomes(
    fn: Callable[[Job], Outcome],
    jobs: list[Job],
    futures: list[Future | None],
    failed: Callable[[str], Outcome],
    *,
    start_method: str = "forkserver",
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
            alone = alone or make_process_pool(1, start_method=start_method)
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
