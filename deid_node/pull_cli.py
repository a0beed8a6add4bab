"""`deid-node pull | pull-status | pull-cancel`: jobs written to the node's database, next to the
running node (no data folder lock taken), and a progress bar while the node works on them."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from deid_node.config import Config, load_config
from deid_node.errors import DeidNodeError
from deid_node.log import get_logger
from deid_node.pull import QUERY_KEYS, validate_query
from deid_node.store import Store, open_existing_store
from deid_node.store.pulls import PULL_JOB_FINAL

log = get_logger("deid_node.pull_cli")


def queries_from_args(args: argparse.Namespace) -> list[dict[str, str]]:
    if args.csv is not None:
        if args.study_date or args.modality:
            raise DeidNodeError("--study-date and --modality go in the CSV's columns with --csv")
        return read_csv(args.csv)
    key, values = next(
        (key, values)
        for key, values in (
            ("accession_number", args.accession),
            ("study_instance_uid", args.study_uid),
            ("patient_id", args.patient_id),
        )
        if values
    )
    extra = {k: v for k, v in (("study_date", args.study_date), ("modality", args.modality)) if v}
    return [validate_query({key: value, **extra}) for value in values]


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DeidNodeError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        # Its message quotes the bytes, which may be part of a name: the type only.
        raise DeidNodeError(
            f"cannot read {path}: not UTF-8 text ({type(exc).__name__}); save it as UTF-8 CSV"
        ) from None
    except csv.Error:
        # Its message may quote a field: the type only.
        raise DeidNodeError(f"cannot read {path}: not a valid CSV file (csv.Error)") from None
    queries = []
    for number, row in enumerate(rows, 2):
        row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        if not any(v.strip() for v in row.values()):
            continue
        try:
            queries.append(validate_query(row))
        except DeidNodeError as exc:
            # The line number only: the row's values are identifying.
            raise DeidNodeError(f"{path} line {number}: {exc}") from None
    if not queries:
        raise DeidNodeError(f"{path}: no lines (header: one of {', '.join(QUERY_KEYS[:3])})")
    return queries


def _open_store(config: Config) -> Store:
    # Neither exclusive nor read-only: writes next to the running node, as `retry` does.
    return open_existing_store(config)


def cmd_pull(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    sources = {s.name: s for s in config.sources}
    if args.source not in sources:
        raise DeidNodeError(
            f"--source: no [[sources]] named {args.source!r} in {args.config}"
            f" (known: {', '.join(sources) or 'none'})"
        )
    projects = config.all_projects
    if args.project:
        project = config.project(args.project).name
    elif len(projects) == 1:
        project = projects[0].name
    else:
        raise DeidNodeError(
            f"--project: required with several projects ({', '.join(p.name for p in projects)})"
        )
    queries = queries_from_args(args)
    if args.dry_run:
        from deid_node.pull import dry_run

        lines = dry_run(config, sources[args.source], queries)
        print(json.dumps(lines, indent=2))
        totals = {k: sum(line.get(k, 0) for line in lines) for k in ("studies", "instances")}
        print(
            f"dry run: {totals['studies']} studies, {totals['instances']} instances would be"
            f" retrieved; {sum(1 for line in lines if line.get('studies') == 0)} lines match"
            " nothing",
            file=sys.stderr,
        )
        return 0
    store = _open_store(config)
    try:
        job_id = store.create_pull_job(args.source, queries, project)
        log.info(
            "pull_submitted", job_id=job_id, source=args.source, project=project, lines=len(queries)
        )
        print(f"pull job {job_id} submitted ({len(queries)} lines)", file=sys.stderr)
        if args.no_wait:
            print(job_id)
            return 0
        try:
            job = follow(store, job_id)
        except KeyboardInterrupt:
            print(f"\ndetached; job {job_id} goes on (deid-node pull-status)", file=sys.stderr)
            return 0
    finally:
        store.close()
    print(json.dumps(job, indent=2))
    return 0 if job["state"] == "done" else 1


def follow(store: Store, job_id: int, poll: float = 1.0) -> dict[str, Any]:
    """A progress bar until the job ends: studies retrieved of found, instances, series out."""
    from tqdm import tqdm

    with tqdm(total=0, unit="study", desc=f"pull {job_id}", file=sys.stderr) as bar:
        while True:
            job = store.pull_jobs(job_id)[0]
            studies = job["studies"]
            bar.total = studies["found"]
            bar.n = studies.get("retrieved", 0) + studies.get("failed", 0)
            bar.set_postfix(
                lines_left=job["lines"].get("pending", 0),
                not_found=job["lines"].get("not_found", 0),
                failed=studies.get("failed", 0),
                instances=job["instances_retrieved"],
                series_forwarded=job["series_forwarded"],
                state=job["state"],
            )
            if job["state"] in PULL_JOB_FINAL:
                return job
            time.sleep(poll)


def cmd_pull_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = open_existing_store(config, readonly=True)
    try:
        jobs = store.pull_jobs(args.job)
        if args.job is not None and not jobs:
            raise DeidNodeError(f"no pull job {args.job}")
        if args.detail:
            if args.job is None:
                raise DeidNodeError("--detail needs a JOB")
            jobs[0]["lines_detail"] = store.pull_job_detail(args.job)
    finally:
        store.close()
    print(json.dumps(jobs, indent=2))
    return 0


def cmd_pull_cancel(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = _open_store(config)
    try:
        if not store.request_pull_cancel(args.job):
            raise DeidNodeError(f"pull job {args.job}: unknown or already over")
    finally:
        store.close()
    log.info("pull_cancel_requested", job_id=args.job)
    print(f"pull job {args.job}: cancel requested")
    return 0
