"""Command line: `deid-node serve | deidentify | status | retry | check-config | console | pull`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from deid_node.config import Config, load_config
from deid_node.errors import DeidNodeError
from deid_node.log import configure_logging, get_logger
from deid_node.modes import DeidentifyRedactTextMode

EXIT_USAGE = 2
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except DeidNodeError as exc:
        print(f"deid-node: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deid-node", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node: C-STORE SCP, de-identify, forward")
    serve.add_argument("--config", required=True, type=Path)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(func=cmd_check_config)

    deid = sub.add_parser("deidentify", help="de-identify files and folders on disk")
    deid.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (recursed)")
    deid.add_argument("--out", required=True, type=Path, help="output folder")
    deid.add_argument(
        "--report",
        type=Path,
        default=Path("deid-report.json"),
        help="the JSON report, mode 0600; never inside --out (default: ./deid-report.json)",
    )
    deid.add_argument(
        "--config", type=Path, help="use its [deid], [pixels] and [[save_conditions]]"
    )
    deid.add_argument(
        "--project",
        help="with --config: that project's sections and secret (the node's UIDs for it)",
    )
    deid.add_argument("--redact-pixels-mode", choices=[m.value for m in DeidentifyRedactTextMode])
    deid.add_argument("--no-redact-tags", action="store_true", help="leave header tags untouched")
    deid.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1)
    deid.add_argument("--data-dir", type=Path, help="where the installation secret lives")
    deid.set_defaults(func=cmd_deidentify)

    status = sub.add_parser("status", help="series and delivery states of a node")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--project", help="one project's series and deliveries only")
    status.set_defaults(func=cmd_status)

    retry = sub.add_parser(
        "retry",
        help="send a failed series again; process its failed rounds and quarantined files again",
    )
    retry.add_argument("--config", required=True, type=Path)
    retry.add_argument("--series", required=True, help="original SeriesInstanceUID")
    retry.add_argument("--project", help="in this project only (default: every project)")
    retry.set_defaults(func=cmd_retry)

    db = sub.add_parser("db", help="the node's database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser(
        "upgrade", help="apply the schema migrations (the node also does at start)"
    )
    upgrade.add_argument("--config", required=True, type=Path)
    upgrade.set_defaults(func=cmd_db_upgrade)

    _add_pull_parsers(sub)

    console = sub.add_parser("console", help="operator console: manage its users")
    console_sub = console.add_subparsers(required=True, metavar="ACTION")
    add_user = console_sub.add_parser(
        "add-user", help="add or replace a console user in console.users_file"
    )
    add_user.add_argument("name", metavar="NAME")
    add_user.add_argument("--role", required=True, choices=["operator", "viewer"])
    add_user.add_argument("--config", required=True, type=Path)
    add_user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    add_user.set_defaults(func=cmd_console_add_user)
    add_token = console_sub.add_parser(
        "add-token", help="create an API token (printed once) for scripts: Authorization: Bearer"
    )
    add_token.add_argument("name", metavar="NAME")
    add_token.add_argument("--role", required=True, choices=["operator", "viewer"])
    add_token.add_argument("--config", required=True, type=Path)
    add_token.set_defaults(func=cmd_console_add_token)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from deid_node.node import Node

    node = Node(load_config(args.config))

    def on_signal(_signum: int, _frame: object) -> None:
        node.request_stop()

    # Both set explicitly: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.serve_forever()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: OK ({len(config.save_conditions)} save conditions, "
        f"{len(config.destinations)} destinations, data_dir {config.node.data_dir})"
    )
    return 0


def cmd_deidentify(args: argparse.Namespace) -> int:
    from deid_node.api import DEFAULT_DATA_DIR, build_settings, worker_pool
    from deid_node.batch import check_inputs, check_report_path, run_batch, write_report

    # Checked before anything runs: a mistyped path must not replace an earlier report.
    check_inputs(args.paths)
    report_path = check_report_path(args.report, args.out)
    config = load_config(args.config) if args.config else Config()
    if args.project and not args.config:
        raise DeidNodeError("--project needs --config")
    project = config.project(args.project) if args.project else None
    deid = project.deid if project else config.deid
    if not args.config:
        deid = replace(deid, redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT)
    if args.redact_pixels_mode:
        deid = replace(deid, redact_pixels_mode=DeidentifyRedactTextMode(args.redact_pixels_mode))
    if args.no_redact_tags:
        deid = replace(deid, redact_dicom_tags=False)
    data_dir = args.data_dir or (config.node.data_dir if args.config else DEFAULT_DATA_DIR)
    settings = build_settings(
        deid=deid,
        pixels=project.pixels if project else config.pixels,
        conditions=project.save_conditions if project else config.save_conditions,
        policy=project.series.policy if project else config.series.policy,
        data_dir=data_dir,
        secret_name=project.secret if project else "default",
    )
    done: list[dict] = []
    try:
        with worker_pool(args.workers) as executor:
            result = run_batch(
                args.paths, args.out, settings, executor=executor, on_series=done.extend
            )
    finally:
        # Always written, also when the run stops half-way: it says what left and what did not.
        write_report(report_path, done)
    print(f"deid-node: {result.summary_line()}; report {args.report}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deid_node.store import open_existing_store

    config = load_config(args.config)
    if args.project:
        config.project(args.project)  # ConfigError naming the known ones
    store = open_existing_store(config, readonly=True)
    status = store.status(args.project)
    if config.store.backend == "postgresql":
        store.lease_seconds = config.store.lease_seconds
        status["replicas"] = store.replicas()
    status["pull_jobs"] = [
        {k: v for k, v in job.items() if k != "study_list"}
        for job in store.pull_jobs()
        if not args.project or job.get("project") == args.project
    ]
    print(json.dumps(status, indent=2))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from deid_node.store import open_existing_store

    config = load_config(args.config)
    if args.project:
        config.project(args.project)  # ConfigError naming the known ones
    store = open_existing_store(config)
    try:
        processing = store.retry_processing(args.series, args.project)
        deliveries = store.retry_series(args.series, args.project)
    finally:
        store.close()
    scope = f" in project {args.project}" if args.project else ""
    print(
        f"re-queued {deliveries} failed deliveries, {processing['batches']} failed processing"
        f" rounds and {processing['instances']} quarantined instances of series"
        f" {args.series}{scope}"
    )
    get_logger("deid_node.cli").info(
        "retry_requested",
        series_uid=args.series,
        project=args.project,
        deliveries=deliveries,
        **processing,
    )
    return 0 if deliveries or processing["batches"] or processing["instances"] else EXIT_ERROR


def _pull_command(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of pull_cli, imported when it runs: pull_cli brings pynetdicom and the store,
    a tenth of a second at start-up that `deidentify` does not need."""

    def run(args: argparse.Namespace) -> int:
        from deid_node import pull_cli

        return int(getattr(pull_cli, name)(args))

    return run


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from deid_node.store import open_store
    from deid_node.store.schema import MIGRATIONS

    config = load_config(args.config)
    store = open_store(config)  # migrates: under the data folder's lock, or an advisory lock
    try:
        version = store.engine.schema_version()
    finally:
        store.close()
    print(f"{config.store.backend} database at schema version {version} of {len(MIGRATIONS)}")
    return 0 if version == len(MIGRATIONS) else EXIT_ERROR


def _add_pull_parsers(sub: argparse._SubParsersAction) -> None:
    cmd_pull, cmd_pull_status, cmd_pull_cancel = map(
        _pull_command, ("cmd_pull", "cmd_pull_status", "cmd_pull_cancel")
    )

    pull = sub.add_parser(
        "pull", help="submit a pull job to the running node: C-FIND + C-MOVE from a source PACS"
    )
    pull.add_argument("--config", required=True, type=Path)
    pull.add_argument("--source", required=True, help="a [[sources]] name")
    pull.add_argument(
        "--project", help="the project the studies feed (required with several projects)"
    )
    what = pull.add_mutually_exclusive_group(required=True)
    what.add_argument("--accession", nargs="+", metavar="A")
    what.add_argument("--study-uid", nargs="+", metavar="UID")
    what.add_argument("--patient-id", nargs="+", metavar="ID")
    what.add_argument(
        "--csv", type=Path, help="header: accession_number | study_instance_uid | patient_id"
    )
    pull.add_argument("--study-date", metavar="YYYYMMDD-YYYYMMDD")
    pull.add_argument("--modality", metavar="CT")
    pull.add_argument("--no-wait", action="store_true", help="submit and return (no progress bar)")
    pull.add_argument(
        "--dry-run", action="store_true", help="C-FIND only: what would be retrieved, per line"
    )
    pull.set_defaults(func=cmd_pull)
    pull_status = sub.add_parser("pull-status", help="pull jobs: counts and study UIDs")
    pull_status.add_argument("--config", required=True, type=Path)
    pull_status.add_argument("job", nargs="?", type=int, metavar="JOB")
    pull_status.add_argument(
        "--detail", action="store_true", help="also each input line (identifying values)"
    )
    pull_status.set_defaults(func=cmd_pull_status)
    pull_cancel = sub.add_parser("pull-cancel", help="stop a pull job")
    pull_cancel.add_argument("--config", required=True, type=Path)
    pull_cancel.add_argument("job", type=int, metavar="JOB")
    pull_cancel.set_defaults(func=cmd_pull_cancel)


def cmd_console_add_user(args: argparse.Namespace) -> int:
    import getpass

    from deid_node.console.auth import add_user

    config = load_config(args.config)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise DeidNodeError("console add-user: the passwords differ")
    add_user(config.console.users_file, args.name, args.role, password)
    print(f"{args.name} ({args.role}) written to {config.console.users_file}")
    return 0


def cmd_console_add_token(args: argparse.Namespace) -> int:
    from deid_node.console.auth import add_token

    config = load_config(args.config)
    print(add_token(config.console.users_file, args.name, args.role))
    print(f"token {args.name} ({args.role}): shown once, only its hash is kept", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
