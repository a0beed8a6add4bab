#!/usr/bin/env python3
"""Query the node's per-file reports.

    python scripts/query_reports.py --config config/deid-node.toml [--study UID] [--series UID]
        [--since ISO-8601] [--failed] [--project NAME] [--format json|table|csv]

--format json prints one JSON array of report objects (Encord's keys plus ours).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deid_node.config import load_config  # noqa: E402
from deid_node.errors import DeidNodeError  # noqa: E402
from deid_node.store import open_existing_store  # noqa: E402

COLUMNS = (
    "project",
    "url",
    "SeriesInstanceUID",
    "save_condition",
    "save_condition_series_agg",
    "series_state",
    "url_deid",
    "error",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--study", help="original StudyInstanceUID")
    parser.add_argument("--series", help="original SeriesInstanceUID")
    parser.add_argument("--since", help="received at or after this time (ISO-8601, UTC if no zone)")
    parser.add_argument("--failed", action="store_true", help="only files that did not leave")
    parser.add_argument("--project", help="only this project's files")
    parser.add_argument("--format", choices=["json", "table", "csv"], default="table")
    args = parser.parse_args(argv)
    try:
        since = _normalise_since(args.since) if args.since else None
        config = load_config(args.config)
        if args.project:
            config.project(args.project)  # an error naming the known projects
        store = open_existing_store(config, readonly=True)
        reports = store.reports(
            study_uid=args.study,
            series_uid=args.series,
            since=since,
            failed=args.failed,
            project=args.project,
        )
    except DeidNodeError as exc:
        print(f"query_reports: error: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        json.dump(reports, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(reports)
    else:
        _print_table(reports)
    return 0


def _normalise_since(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DeidNodeError(f"--since: not an ISO-8601 date or time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _print_table(reports: list[dict]) -> None:
    rows = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in COLUMNS] for r in reports]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"{len(reports)} file(s)")


if __name__ == "__main__":
    sys.exit(main())
