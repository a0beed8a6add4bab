"""Batch: a worker process that dies costs only the file that killed it, and the rest of the run
keeps as many workers; a killed run's staging folder is removed by the next run into the same
--out, never the folder of a run going on."""

from __future__ import annotations

import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicomgen import make_series, write_series
from faultpeers import children
from structlog.testing import capture_logs

from deid_node.api import build_settings, worker_pool
from deid_node.batch import STAGING_LOCK, STAGING_PREFIX, run_batch
from deid_node.config import DeidConfig, PixelsConfig
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
from deid_node.workers import (
    AHEAD_PER_WORKER,
    RenewablePool,
    map_jobs_renewing,
    pool_is_broken,
)

DIED = "worker process died on this file (crash or memory)"


def settings_for(data_dir: Path):
    return build_settings(
        deid=DeidConfig(redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT),
        pixels=PixelsConfig(),
        conditions=(),
        policy=SeriesPolicy.ALL,
        data_dir=data_dir,
    )


def write_worker_killer(path: Path, depth: int = 50_000) -> None:
    """A CT file with a private sequence nested `depth` deep after its pixel data. pydicom reads
    nested sequences recursively: with the recursion limit lifted and a small stack
    (`crashing_workers`), reading the whole file overflows the C stack and the worker dies of
    SIGSEGV, as a decoder crash would. A header read without pixel data (the parent's) stops
    before it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_series(1, "CT")[0].save_as(path, enforce_file_format=True)
    creator = struct.pack("<HH", 0x7FE1, 0x0010) + b"LO" + struct.pack("<H", 8) + b"DEIDTEST"
    seq = struct.pack("<HH", 0x7FE1, 0x1010) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    nested = seq + (item_start + seq) * depth + (seq_end + item_end) * depth + seq_end
    with path.open("ab") as handle:
        handle.write(creator + nested)


@pytest.fixture
def crashing_workers():
    """Worker processes forked from here while it lasts overflow their stack on
    write_worker_killer's file instead of raising RecursionError (a 1 MiB stack: the crash
    comes in a tenth of a second rather than seconds)."""
    limit = sys.getrecursionlimit()
    stack = resource.getrlimit(resource.RLIMIT_STACK)
    sys.setrecursionlimit(1_000_000)
    resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, stack[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, stack)
        sys.setrecursionlimit(limit)


def holding(pids: set[int], name: str) -> set[int]:
    """The processes among `pids` with a file named `name` open."""
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # exited meanwhile
        if any(Path(link.removesuffix(" (deleted)")).name == name for link in links):
            found.add(pid)
    return found


def published(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.dcm") if not any(x.startswith(STAGING_PREFIX) for x in p.parts)]


def test_a_worker_death_costs_its_file_only_and_the_rest_keeps_two_workers(
    tmp_path, crashing_workers
):
    root = tmp_path / "in"
    write_worker_killer(root / "0-killer.dcm")  # sorted first: input #1, 99 files after it
    for n in range(3):
        write_series(make_series(33, "CT", image_type="DERIVED\\SECONDARY"), root / f"s{n}")
    out = tmp_path / "out"
    # Processes this one forked before (an earlier test's pool winding down, a forkserver)
    # are not this pool's.
    before = children(os.getpid())
    with worker_pool(2) as pool:
        original = children(os.getpid()) - before  # the pool's two workers, started before the run
        assert len(original) == 2
        forked: list[set[int]] = []

        def on_series(_reports):
            # The pools started after the death, alive.
            forked.append(children(os.getpid()) - original - before)

        result = run_batch(
            [root], out, settings_for(tmp_path / "d"), executor=pool, on_series=on_series
        )
        # Workers forked during the run do not hold its staging lock: a run killed with its
        # workers left behind leaves a folder that the next run can remove.
        assert forked[0] and holding(forked[0], STAGING_LOCK) == set()
        # The pool the caller holds is usable for its next run.
        assert not pool_is_broken(pool)
        assert pool.submit(abs, -3).result(timeout=60) == 3
    urls = [f"{root}#{n}" for n in range(1, 101)]
    assert sorted(r["url"] for r in result.reports) == sorted(urls), "one report per input"
    by_url = {r["url"]: r for r in result.reports}
    killer = by_url[urls[0]]
    assert killer["error"] == DIED and killer["url_deid"] is None
    others = [by_url[u] for u in urls[1:]]
    assert [r for r in others if r.get("error") or not r["url_deid"]] == []
    assert len({r["url_deid"] for r in others}) == 99
    assert sorted(published(out)) == sorted(Path(r["url_deid"]) for r in others)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # After the death the run went on in processes started for it, more than one of them: the
    # files that were not submitted before the killer's outcome (at most AHEAD_PER_WORKER per
    # worker are ahead of it), and so not before the death either.
    assert result.worker_pids[urls[0]] is None
    late = {result.worker_pids[u] for u in urls[2 * AHEAD_PER_WORKER :]}
    assert None not in late
    assert len(late - original) >= 2, (
        f"after the death, files ran in {len(late - original)} process"
    )


def square_or_die(n: int) -> tuple[int, int]:
    if n == 3:
        os._exit(3)  # a worker killed under this job (the OOM killer, a decoder crash)
    time.sleep(0.01)  # a job that takes a while: both workers get some
    return n * n, os.getpid()


def test_map_jobs_renewing_fails_the_killer_only_and_renews_the_pool():
    pool = RenewablePool(2, start_method="fork")
    try:
        first = pool.executor
        outcomes = list(
            map_jobs_renewing(
                square_or_die, range(40), pool, lambda why: (why, None), window=3, ahead=8
            )
        )
        assert pool.executor is not first and not pool_is_broken(pool)
        assert pool.submit(abs, -2).result(timeout=60) == 2
    finally:
        pool.shutdown()
    assert outcomes[3] == (DIED, None)
    assert [o[0] for o in outcomes[:3] + outcomes[4:]] == [n * n for n in range(40) if n != 3]
    # Jobs 11 on were submitted after job 3's outcome (8 ahead at most): to the new pool.
    assert len({pid for _, pid in outcomes[11:]}) == 2


# -- staging folders of killed runs ------------------------------------------------------------

# A batch run in a process of its own. Once its first series is reported, every file has been
# de-identified into its staging folder; then it kills itself ("die") or waits for a line on
# stdin before it goes on ("hold").
RUN = """
import os, signal, sys
from pathlib import Path
from deid_node.api import build_settings
from deid_node.batch import run_batch
from deid_node.config import DeidConfig, PixelsConfig
from deid_node.modes import SeriesPolicy

inputs, out, data, action = sys.argv[1:5]
settings = build_settings(deid=DeidConfig(redact_pixels_mode="REDACT_NO_TEXT"),
    pixels=PixelsConfig(), conditions=(),
    policy=SeriesPolicy.ALL, data_dir=Path(data))
first = []

def on_series(_reports):
    if first:
        return
    first.append(True)
    print("staged", flush=True)
    if action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()

result = run_batch([inputs], Path(out), settings, on_series=on_series, progress=False)
print("done", result.files_written, flush=True)
"""


def start_run(inputs: Path, out: Path, data: Path, action: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(inputs), str(out), str(data), action],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            break
    raise AssertionError(f"no line from the run (exit status {proc.poll()})")


def staging_folders(out: Path) -> list[Path]:
    return sorted(out.glob(f"{STAGING_PREFIX}*"))


def two_series(root: Path) -> None:
    write_series(make_series(2, "CT", image_type="DERIVED\\SECONDARY"), root / "a")
    write_series(make_series(3, "MR", image_type="DERIVED\\SECONDARY"), root / "b")


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    two_series(tmp_path / "in")
    out = tmp_path / "out"
    with start_run(tmp_path / "in", out, tmp_path / "d", "die") as killed:
        try:
            assert read_line(killed) == "staged"
            assert killed.wait(timeout=60) == -signal.SIGKILL
        finally:
            killed.kill()
    (stale,) = staging_folders(out)
    assert len(list(stale.rglob("*.dcm"))) >= 2, "the killed run left de-identified files"
    write_series(make_series(1, "CT", image_type="DERIVED\\SECONDARY"), tmp_path / "next")
    with capture_logs() as logs:
        result = run_batch([tmp_path / "next"], out, settings_for(tmp_path / "d"), progress=False)
    assert result.files_written == 1
    assert staging_folders(out) == []
    found = [e for e in logs if e["event"] == "staging_folders_found"]
    assert found == [
        {
            "event": "staging_folders_found",
            "log_level": "info",
            "removed": 1,
            "in_use": 0,
            "without_lock": 0,
        }
    ]


def test_the_staging_folder_of_a_run_going_on_is_left_alone(tmp_path):
    two_series(tmp_path / "in")
    write_series(make_series(1, "CT", image_type="DERIVED\\SECONDARY"), tmp_path / "next")
    out = tmp_path / "out"
    with start_run(tmp_path / "in", out, tmp_path / "d", "hold") as running:
        try:
            assert read_line(running) == "staged"
            (theirs,) = staging_folders(out)
            staged = sorted(theirs.rglob("*.dcm"))
            assert staged, "the other run has files waiting in its staging folder"
            with capture_logs() as logs:
                result = run_batch(
                    [tmp_path / "next"], out, settings_for(tmp_path / "d"), progress=False
                )
            assert result.files_written == 1
            assert staging_folders(out) == [theirs] and sorted(theirs.rglob("*.dcm")) == staged
            found = [e for e in logs if e["event"] == "staging_folders_found"]
            assert [(e["removed"], e["in_use"]) for e in found] == [(0, 1)]
            assert running.stdin is not None
            running.stdin.write("go on\n")
            running.stdin.flush()
            assert read_line(running) == "done 5"  # the other run published all of its files
            assert running.wait(timeout=60) == 0
        finally:
            running.kill()
    assert staging_folders(out) == []
    assert len(published(out)) == 6
