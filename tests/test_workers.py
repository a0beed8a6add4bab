"""workers.pool_is_broken / replace_pool: the one place that reads ProcessPoolExecutor's
private `_broken` flag. Fails if a Python upgrade removes or renames it."""

from __future__ import annotations

import os
from concurrent.futures.process import BrokenProcessPool

import pytest

from deid_node.workers import make_process_pool, pool_is_broken, replace_pool


def _die() -> None:
    os._exit(3)  # a worker killed under a job (the OOM killer, a decoder crash)


def test_a_dead_worker_marks_the_pool_broken_and_replace_pool_gives_a_working_one():
    pool = make_process_pool(2, start_method="fork")
    try:
        assert hasattr(pool, "_broken"), "ProcessPoolExecutor lost its private _broken flag"
        assert not pool_is_broken(pool)
        with pytest.raises(BrokenProcessPool):
            pool.submit(_die).result(timeout=60)
        assert pool_is_broken(pool)
        fresh = replace_pool(pool, start_method="fork")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    try:
        assert not pool_is_broken(fresh)
        assert getattr(fresh, "_max_workers", None) == 2
        assert fresh.submit(abs, -4).result(timeout=60) == 4
    finally:
        fresh.shutdown(wait=True)
    assert not pool_is_broken(None)
