"""The running node: SCP + series scheduler + processing workers + forwarders (Config -> Node).

Threads, all off the SCP's association threads:
- scheduler: every `poll_seconds`, marks stable series complete, hands complete batches to the
  processing pool, cleans the spool;
- processing pool (`node.workers` threads): one batch at a time each, through `pipeline`, with
  the per-file work in a process pool of the same size (both cores, one OCR model per process);
- one forwarder per destination, so a destination that is down never delays another.
All state lives in SQLite; after a crash or restart the node resumes from it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from deid_node.config import Config, DestinationConfig, ProjectConfig
from deid_node.deid.uids import load_or_create_secret
from deid_node.errors import ConfigError, DestinationUnreachableError
from deid_node.forward import DestinationLink, Outgoing, backoff_seconds, send_batch
from deid_node.log import get_logger, safe_error
from deid_node.modes import SeriesPolicy
from deid_node.pipeline import PipelineSettings, SourceFile, run_series
from deid_node.routing import Router
from deid_node.scp import enable_chunked_receive, start_server
from deid_node.store import open_store
from deid_node.store.replicas import ClaimLostError
from deid_node.workers import make_process_pool, pool_is_broken, replace_pool

log = get_logger("deid_node.node")

# A batch whose processing raised (not a bad file: those are quarantined) is retried this often.
MAX_PROCESSING_ATTEMPTS = 3


def pipeline_settings(project: ProjectConfig, secret: bytes) -> PipelineSettings:
    return PipelineSettings(
        deid=project.deid,
        pixels=project.pixels,
        conditions=project.save_conditions,
        policy=project.series.policy,
        secret=secret,
    )


class Node:
    def __init__(self, config: Config) -> None:
        # Everything the node creates (spool, outputs, quarantine, db) holds patient data until
        # de-identified: owner-only, whatever umask the service manager gave us.
        os.umask(0o077)
        if not config.destinations:
            raise ConfigError("destinations: the node needs at least one [[destinations]] entry")
        self.config = config
        # First thing in data_dir: its lock (DataDirInUseError when another node owns it; with
        # a PostgreSQL store, another process with this replica_id).
        self.store = open_store(config, exclusive=True)
        self.replicated = config.store.backend == "postgresql"
        files = config.files_dir
        # One pipeline per project, each with its own secret (shared where secret_name says).
        self.projects = {p.name: p for p in config.all_projects}
        self.settings = {
            p.name: pipeline_settings(p, load_or_create_secret(files, p.secret))
            for p in config.all_projects
        }
        self.router = Router.from_config(config)
        self._stable = {p.name: p.series.stable_seconds for p in config.all_projects}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._workers = ThreadPoolExecutor(
            max_workers=config.node.workers, thread_name_prefix="series"
        )
        self._pool = make_process_pool(config.node.workers)
        self._pool_lock = threading.Lock()
        self._in_flight = threading.Semaphore(config.node.workers)
        self._destinations = {d.name: d for d in config.destinations}
        # Set when there is work, so that loops do not wait for their next poll.
        self._scheduler_wake = threading.Event()
        self._forward_wake = {d.name: threading.Event() for d in config.destinations}
        # Read by the console (/metrics, overview): each forwarder's view of its destination.
        self._links: dict[str, DestinationLink] = {}
        self._console: Any = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.store.recover_after_restart()
        recovered["orphan_deliveries_failed"] = self.store.fail_orphan_deliveries(
            list(self._destinations)
        )
        node = self.config.node
        enable_chunked_receive(self.store.tmp_dir)
        if self.config.console.enabled:
            self._console = self._start_console()  # ConfigError naming console.port if taken
        try:
            self._server = start_server(node, self.store, router=self.router)
        except OSError as exc:
            self._stop_console()
            raise ConfigError(
                f"node.port: cannot listen on {node.host}:{node.port}: {exc.strerror or exc}"
            ) from None
        if self.replicated:
            self.store.register_replica(self.port if self._server else node.port)
            self._spawn("heartbeat", self._heartbeat_loop)
        self._spawn("scheduler", self._schedule_loop)
        for dest in self.config.destinations:
            self._spawn(f"forward-{dest.name}", self._forward_loop, dest)
        if self.config.sources:
            from deid_node.pull import PullWorker

            self._spawn("pull", PullWorker(self.config, self.store, self._stop).run)
        log.info(
            "node_started",
            ae_title=node.ae_title,
            host=node.host,
            port=self.port,
            data_dir=str(self.config.files_dir),
            replica_id=node.replica_id if self.replicated else None,
            destinations=[d.name for d in self.config.destinations],
            projects={p.name: list(p.called_ae_titles) for p in self.projects.values()},
            tls=node.tls is not None,
            **recovered,
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.node.port

    @property
    def console_port(self) -> int | None:
        return self._console.port if self._console else None

    def scp_listening(self) -> bool:
        return self._server is not None

    def destinations_up(self) -> dict[str, bool]:
        """Folder destinations are up; a DICOM one is up until its forwarder found it down."""
        return {
            name: not (self._links[name].down if name in self._links else False)
            for name in self._destinations
        }

    def _start_console(self) -> Any:
        from deid_node.console.metrics import NodeView
        from deid_node.console.server import ConsoleServer

        view = NodeView(
            store=self.store,
            scp_listening=self.scp_listening,
            destinations_up=self.destinations_up,
            request_reprocess=self._scheduler_wake.set,
            series_policy=self.config.series.policy.value,
            max_decoded_bytes=self.config.node.max_decoded_mb * 2**20,
        )
        console = ConsoleServer(self.config.console, view)
        console.start()
        return console

    def _stop_console(self) -> None:
        if self._console is not None:
            self._console.stop()
            self._console = None

    def stop(self) -> None:
        """Stop accepting, let associations and batches in progress finish, persist, exit."""
        if self._server is not None:
            # New associations are rejected from now on, connections without one closed; those
            # in progress get up to network_timeout_seconds to finish (scp/server.py).
            self._server.stop(self.config.node.network_timeout_seconds)
            self._server = None
        self._stop_console()
        self.request_stop()
        for thread in self._threads:
            thread.join(timeout=60)
        self._workers.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self.store.close()
        log.info("node_stopped")

    def request_stop(self) -> None:
        """Ask serve_forever to stop (safe from a signal handler)."""
        self._stop.set()
        for event in (self._scheduler_wake, *self._forward_wake.values()):
            event.set()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(
            target=self._guard, args=(name, target, *args), name=name, daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _guard(self, name: str, target: Any, *args: Any) -> None:
        """Run a loop; an unexpected error is logged and the loop restarted after a pause."""
        while not self._stop.is_set():
            try:
                target(*args)
            except Exception as exc:
                log.error("loop_error", loop=name, **safe_error(exc))
                self._stop.wait(self.config.node.poll_seconds)

    # -- scheduling and processing --------------------------------------------------------

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            self.store.complete_stable_batches(self.config.series.stable_seconds, self._stable)
            while self._in_flight.acquire(blocking=False):
                batch_id = self.store.claim_batch()
                if batch_id is None:
                    self._in_flight.release()
                    break
                self._workers.submit(self._process_guarded, batch_id)
            self._clean_spool()
            self._wake(self._scheduler_wake, self._seconds_until_next_stable())

    def _seconds_until_next_stable(self) -> float:
        """Sleep until the next receiving batch becomes stable, at most poll_seconds."""
        stable_at = self.store.next_stable_at(self.config.series.stable_seconds, self._stable)
        poll = self.config.node.poll_seconds
        if stable_at is None:
            return poll
        return min(poll, max(0.02, stable_at - time.time()))

    def _wake(self, event: threading.Event, timeout: float) -> None:
        """Wait for `event` (work for this loop) or stop or the timeout, then re-arm it."""
        if not self._stop.is_set():
            event.wait(timeout)
        event.clear()

    def _process_guarded(self, batch_id: int) -> None:
        try:
            self.process_batch(batch_id)
        except ClaimLostError:
            # This replica stalled past its lease; another one processed the batch again.
            log.warning("claim_lost", batch_id=batch_id)
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool):
                self._replace_broken_pool()
            fields = safe_error(exc)
            state = self.store.processing_failed(
                batch_id, fields.get("error", fields["error_type"]), MAX_PROCESSING_ATTEMPTS
            )
            log.error("batch_error", batch_id=batch_id, next_state=state, **fields)
        finally:
            self._in_flight.release()
            self._scheduler_wake.set()  # a slot is free: claim the next complete batch now

    def _heartbeat_loop(self) -> None:
        """Replicas: renew this replica's leases every third of lease_seconds, and put back in
        the queue the work of replicas whose leases ran out (they died or lost the database)."""
        interval = self.config.store.lease_seconds / 3
        while not self._stop.is_set():
            self.store.heartbeat()
            taken = self.store.requeue_expired()
            if any(taken.values()):
                log.warning("replica_work_taken_over", **taken)
                for event in (self._scheduler_wake, *self._forward_wake.values()):
                    event.set()
            self._stop.wait(interval)

    def _replace_broken_pool(self) -> None:
        """A worker died (killed, out of memory, crash in a decoder): start a new pool, once,
        even when every batch running on the old one reports it."""
        with self._pool_lock:
            if not pool_is_broken(self._pool):
                return  # another thread replaced it already
            self._pool = replace_pool(self._pool, workers=self.config.node.workers)

    def process_batch(self, batch_id: int) -> str:
        started = time.monotonic()
        batch = self.store.batch(batch_id)
        project = self.projects.get(batch["project"])
        if project is None:
            # Received for a project since removed from the config: kept, failed, and
            # processed again by `retry` once the project is back.
            raise ConfigError(f"project {batch['project']!r} is no longer in the config")
        settings = self.settings[project.name]
        if settings.policy is SeriesPolicy.ALL:
            # A new attempt at the instance that held the series back (retry, re-send,
            # release): what the policy withheld because of it goes again, with it.
            joined = self.store.join_withheld(batch_id)
            if joined:
                log.info(
                    "withheld_joined",
                    series_uid=batch["series_uid"],
                    batch_id=batch_id,
                    round=batch["round"],
                    instances=joined,
                )
        rows = self.store.batch_instances(batch_id)
        sources = [
            SourceFile(
                row["url"],
                Path(row["spool_path"]),
                row["id"],
                pixels_reviewed=bool(row.get("pixels_reviewed")),
            )
            for row in rows
        ]
        earlier = self.store.earlier_reports(batch["series_uid"], batch["round"], project.name)
        by_id = {row["id"]: row for row in rows}

        def extra(source: SourceFile) -> dict[str, Any]:
            row = by_id[source.key]
            return {
                "project": project.name,
                "calling_ae": row["calling_ae"],
                "received_at": row["received_at"],
                "round": batch["round"],
                "late": batch["round"] > 1 or None,
                # A new attempt at an instance quarantined before (re-sent or retried).
                "attempt": row["attempt"] if row["attempt"] > 1 else None,
            }

        outcome = run_series(
            sources,
            settings,
            self.store.data_dir / "deid" / str(batch_id),
            executor=self._pool,
            earlier=earlier,
            url_for_output=lambda _path: None,  # set once a destination acknowledges it
            extra=extra,
        )
        # A worker died under this series or another one: the pipeline ran the files it took
        # down again alone (no series is charged for it); the next series get a new pool.
        if pool_is_broken(self._pool):
            self._replace_broken_pool()
        for r in outcome.results:
            if r.state == "quarantined":
                # Kept for the operator, out of the spool that retention empties. Named now,
                # moved after the commit: a crash between the two is completed at start.
                r.report["quarantine"] = str(
                    self.store.quarantine_path_for(r.source.key, r.source.path)
                )
        results = [
            {
                "instance_id": r.source.key,
                "state": r.state,
                "report": r.report,
                "deid_path": str(r.deid_path) if r.deid_path else None,
                "sop_uid_deid": r.sop_uid_deid,
                "error": r.error,
            }
            for r in outcome.results
        ]
        state = self.store.finish_processing(
            batch_id,
            results,
            passed=outcome.passed,
            destinations=list(project.destinations),
            summary=outcome.summary,
        )
        for r in outcome.results:
            if r.state == "quarantined":
                self.store.move_to_quarantine(r.source.path, Path(r.report["quarantine"]))
        for event in self._forward_wake.values():
            event.set()
        log.info(
            "series_processed",
            project=project.name,
            series_uid=batch["series_uid"],
            batch_id=batch_id,
            round=batch["round"],
            calling_ae=batch["calling_ae"],
            state=state,
            **{**outcome.summary, "duration_s": round(time.monotonic() - started, 3)},
        )
        return state

    def _clean_spool(self) -> None:
        # A receipt takes at most a network timeout per PDU; twice that and it was abandoned.
        self.store.remove_stale_tmp(2 * self.config.node.network_timeout_seconds + 60)
        for batch_id in self.store.batches_to_clean(self.config.node.retention_hours):
            removed = self.store.release_originals(batch_id)
            self.store.forget_files(batch_id)
            log.debug("spool_released", batch_id=batch_id, files=removed)

    # -- forwarding -------------------------------------------------------------------------

    def _forward_loop(self, dest: DestinationConfig) -> None:
        link = DestinationLink(dest)
        self._links[dest.name] = link
        if dest.type != "folder":
            # Unknown until asked: deliveries a previous run left waiting out a backoff go as
            # soon as the first probe is answered.
            link.mark_down()
        while not self._stop.is_set():
            if link.down and dest.type != "folder":
                down_for = time.monotonic() - (link.down_since or 0.0)
                if link.probe():
                    # It answers again: what waits out a backoff goes now, not at its next try.
                    due = self.store.make_deliveries_due(dest.name)
                    if due:
                        log.info(
                            "destination_back",
                            destination=dest.name,
                            down_s=round(down_for, 1),
                            deliveries=due,
                        )
            # One due delivery at a time, claimed (replicas never send one twice at once).
            while not self._stop.is_set():
                delivery = self.store.claim_due_delivery(dest.name)
                if delivery is None:
                    break
                if self.forward_delivery(dest, delivery):
                    link.mark_up()
                else:
                    # Unreachable: the others would wait out the same connect timeout one
                    # after the other; the probe makes them due once it answers again.
                    link.mark_down()
                    break
            probe_in = link.seconds_until_probe()
            poll = self.config.node.poll_seconds
            wait = poll if probe_in is None else min(poll, probe_in)
            self._wake(self._forward_wake[dest.name], wait)

    def forward_delivery(self, dest: DestinationConfig, delivery: dict[str, Any]) -> bool:
        """One attempt at a delivery; False when the destination could not be reached."""
        batch = self.store.batch(delivery["batch_id"])
        rows = self.store.unsent_instances(delivery["batch_id"], dest.name)
        items = []
        for row in rows:
            parts = Path(row["deid_path"]).parts
            items.append(
                Outgoing(
                    row["id"], Path(row["deid_path"]), row["sop_uid_deid"], parts[-3], parts[-2]
                )
            )
        started = time.monotonic()
        bound = log.bind(
            project=batch["project"],
            series_uid=batch["series_uid"],
            batch_id=batch["id"],
            destination=dest.name,
        )

        def on_stored(item: Outgoing, url: str, status: int) -> None:
            # Committed before the next instance is sent: a crash between a destination's ack
            # and this commit re-sends only that instance (same derived UIDs: overwritten).
            self.store.mark_sent([(item.instance_id, dest.name, url, status)])

        def on_refused(item: Outgoing, status: int | None, reason: str) -> None:
            # For good: reported, never offered again (a retry cannot change the answer).
            self.store.mark_refused_by_destination(item.instance_id, dest.name, status, reason)
            bound.warning(
                "instance_refused",
                sop_uid_deid=item.sop_uid,
                status=None if status is None else f"0x{status:04X}",
                error=reason,
            )

        try:
            # Nothing left (a kill after the last acknowledgement was committed, before the
            # delivery was marked done): no association, the delivery settles below.
            if items:
                send_batch(
                    dest,
                    items,
                    on_stored,
                    on_refused,
                    # The bound the SCP applied at receive (0: none) also bounds decompression.
                    max_decoded_bytes=self.config.node.max_decoded_mb * 2**20 or None,
                )
            refused = self.store.refused_by_destination(batch["id"], dest.name)
            if refused:
                # Everything else arrived; the refused ones fail the delivery without a retry.
                reasons = sorted({r["reason"] for r in refused})
                error = f"{dest.name}: {len(refused)} instance(s) refused for good: " + "; ".join(
                    reasons[:3] + ([f"{len(reasons) - 3} more reasons"] if len(reasons) > 3 else [])
                )
                self.store.delivery_attempt_failed(delivery["id"], error, None)
                attempt = delivery["attempts"] + 1
                bound.warning("forward_failed", attempt=attempt, error=error, will_retry=False)
                return True
        except Exception as exc:
            # Any failure counts as an attempt (pynetdicom raises ValueError when the peer
            # accepted no context for a file, RuntimeError after an abort): an exception that
            # escaped here would leave this delivery first in the queue forever.
            fields = safe_error(exc)
            error = fields.get("error") or f"{dest.name}: {fields['error_type']}"
            attempts = delivery["attempts"] + 1
            retry_at = (
                time.time() + backoff_seconds(dest, attempts)
                if attempts < dest.max_attempts
                else None
            )
            self.store.delivery_attempt_failed(delivery["id"], error, retry_at)
            bound.warning(
                "forward_failed", attempt=attempts, error=error, will_retry=retry_at is not None
            )
            return not isinstance(exc, DestinationUnreachableError)
        self.store.delivery_done(delivery["id"])
        bound.info(
            "series_forwarded", files=len(items), duration_s=round(time.monotonic() - started, 3)
        )
        return True
