"""Pulling a cohort from a PACS: C-FIND each input line at STUDY level, then C-MOVE each study
found to the node's own AE title, throttled, retried, resumable (all state in the database).

The node runs `PullWorker.run` in a thread; pulled instances arrive at its SCP and take the
normal path (buffer, save conditions, de-identification, forwarding). Input values (accession
numbers, patient IDs, dates) never reach the log: job id, line number and study UIDs do.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from deid_node.config import Config, ProjectConfig, SourceConfig
from deid_node.errors import DeidNodeError
from deid_node.log import get_logger, safe_error
from deid_node.store import Store

log = get_logger("deid_node.pull")

QUERY_KEYS = ("accession_number", "study_instance_uid", "patient_id", "study_date", "modality")
IDENTIFYING_KEYS = ("accession_number", "study_instance_uid", "patient_id")
# A study whose move fails or comes back incomplete is tried this often in all.
MAX_ATTEMPTS = 3
BACKOFF_INITIAL_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 120.0


class PullError(DeidNodeError):
    """A C-FIND or C-MOVE that did not succeed; the message holds no input value."""


def validate_query(query: dict[str, str]) -> dict[str, str]:
    """One input line: exactly one identifying key, optional study_date / modality."""
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise DeidNodeError(f"unknown query key {unknown[0]} (known: {', '.join(QUERY_KEYS)})")
    clean = {k: v.strip() for k, v in query.items() if v is not None and v.strip()}
    named = [k for k in IDENTIFYING_KEYS if k in clean]
    if len(named) != 1:
        raise DeidNodeError(
            "each line needs exactly one of accession_number, study_instance_uid, patient_id"
        )
    date = clean.get("study_date", "")
    if date and not _is_date_range(date):
        raise DeidNodeError("study_date: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
    return clean


def _is_date_range(text: str) -> bool:
    parts = text.split("-")
    return 1 <= len(parts) <= 2 and all(len(p) == 8 and p.isdigit() for p in parts)


def find_identifier(query: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.get("study_instance_uid", "")
    ds.AccessionNumber = query.get("accession_number", "")
    ds.PatientID = query.get("patient_id", "")
    ds.StudyDate = query.get("study_date", "")
    ds.ModalitiesInStudy = query.get("modality", "")
    ds.NumberOfStudyRelatedSeries = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _count(identifier: Dataset, keyword: str) -> int | None:
    """A count from the PACS (an IS value); None when absent or not a number."""
    value = identifier.get(keyword, None)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def backoff_until(attempts: int) -> str:
    delay = min(BACKOFF_INITIAL_SECONDS * 2 ** (attempts - 1), BACKOFF_MAX_SECONDS)
    return (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(timespec="milliseconds")


def find_studies(assoc: Any, query: dict[str, str]) -> list[tuple[str, int | None, int | None]]:
    """One line's C-FIND at STUDY level: (StudyInstanceUID, series, instances) per match."""
    studies: list[tuple[str, int | None, int | None]] = []
    final = None
    for status, identifier in assoc.send_c_find(
        find_identifier(query), StudyRootQueryRetrieveInformationModelFind
    ):
        if not status:
            raise PullError("C-FIND: no answer (association aborted or timed out)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and identifier is not None:
            uid = str(identifier.get("StudyInstanceUID", "") or "")
            if uid:
                studies.append(
                    (
                        uid,
                        _count(identifier, "NumberOfStudyRelatedSeries"),
                        _count(identifier, "NumberOfStudyRelatedInstances"),
                    )
                )
        else:
            final = code
    if final != 0x0000:
        raise PullError(f"C-FIND status 0x{final or 0:04X}")
    return studies


def dry_run(
    config: Config, source: SourceConfig, queries: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """`pull --dry-run`: the C-FIND only; per input line, the number of studies, series and
    instances it would retrieve (no input value in the result)."""
    assoc = open_association(
        application_entity(config, StudyRootQueryRetrieveInformationModelFind), source
    )
    lines = []
    try:
        for number, query in enumerate(queries, 1):
            try:
                found = find_studies(assoc, query)
            except PullError as exc:
                lines.append({"line": number, "error": str(exc)})
                continue
            lines.append(
                {
                    "line": number,
                    "studies": len(found),
                    "series": sum(s or 0 for _, s, _ in found),
                    "instances": sum(i or 0 for _, _, i in found),
                    "study_uids": [uid for uid, _, _ in found],
                }
            )
    finally:
        assoc.release()
    return lines


def application_entity(config: Config, *contexts: Any) -> AE:
    """The node's AE as a requestor (its own AE title, its network timeouts)."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.network_timeout_seconds
    for context in contexts:
        ae.add_requested_context(context)
    return ae


def open_association(ae: AE, source: SourceConfig, **options: Any) -> Any:
    """An established association with the source; PullError (no value in it) otherwise.
    `options` go to `AE.associate` (ext_neg, evt_handlers for a C-GET)."""
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, **options)
    except Exception as exc:
        raise PullError(f"cannot connect to source {source.name}: {type(exc).__name__}") from None
    if not assoc.is_established:
        raise PullError(f"source {source.name} refused or did not answer the association")
    return assoc


class PullWorker:
    def __init__(self, config: Config, store: Store, stop: threading.Event) -> None:
        self.config = config
        self.store = store
        self.stop = stop
        self.sources = {s.name: s for s in config.sources}
        self.wake = threading.Event()

    def run(self) -> None:
        """The node's pull thread: works on open jobs, oldest first, until stop."""
        recovered = self.store.recover_pull_jobs()
        if recovered:
            log.info("pull_resumed", studies_requeued=recovered)
        while not self.stop.is_set():
            for job in self.store.open_pull_jobs():
                if self.stop.is_set():
                    break
                self.work_on(job)
            self.wake.wait(self.config.node.poll_seconds)
            self.wake.clear()

    def _cancelled(self, job_id: int) -> bool:
        return self.store.pull_cancel_requested(job_id)

    def work_on(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        if job["cancel_requested"]:
            self.store.set_pull_job_state(job_id, "cancelled")
            log.info("pull_cancelled", job_id=job_id)
            return
        source = self.sources.get(job["source"])
        if source is None:
            self.store.set_pull_job_state(job_id, "failed", f"no source named {job['source']!r}")
            log.error("pull_failed", job_id=job_id, reason="unknown source")
            return
        project = next((p for p in self.config.all_projects if p.name == job.get("project")), None)
        if project is None:
            self.store.set_pull_job_state(
                job_id, "failed", f"no project named {job.get('project')!r}"
            )
            log.error("pull_failed", job_id=job_id, reason="unknown project")
            return
        if job["state"] == "queued":
            self.store.set_pull_job_state(job_id, "running")
            log.info("pull_started", job_id=job_id, source=source.name, project=project.name)
        self._resolve_lines(job_id, source)
        self._retrieve_studies(job_id, source, project)
        if self._cancelled(job_id):
            self.store.set_pull_job_state(job_id, "cancelled")
            log.info("pull_cancelled", job_id=job_id)
        elif self.store.pull_job_open_work(job_id) == 0:
            summary = self.store.pull_jobs(job_id)[0]
            self.store.set_pull_job_state(job_id, "done")
            log.info(
                "pull_done",
                job_id=job_id,
                lines=summary["lines"],
                studies={k: v for k, v in summary["studies"].items()},
                instances=summary["instances_retrieved"],
            )

    # -- C-FIND ---------------------------------------------------------------------------

    def _resolve_lines(self, job_id: int, source: SourceConfig) -> None:
        lines = self.store.pending_pull_lines(job_id)
        if not lines:
            return
        try:
            assoc = self._associate(source, StudyRootQueryRetrieveInformationModelFind)
        except PullError as exc:
            log.warning("pull_find_unreachable", job_id=job_id, source=source.name, error=str(exc))
            self.stop.wait(BACKOFF_INITIAL_SECONDS)
            return
        try:
            for line in lines:
                if self.stop.is_set() or self._cancelled(job_id):
                    return
                try:
                    studies = self._find(assoc, line["query"])
                except PullError as exc:
                    self.store.record_pull_line(job_id, line["id"], [], error=str(exc))
                    log.warning(
                        "pull_line_failed", job_id=job_id, line=line["line_no"], error=str(exc)
                    )
                    continue
                added = self.store.record_pull_line(job_id, line["id"], studies)
                log.info(
                    "pull_line_resolved",
                    job_id=job_id,
                    line=line["line_no"],
                    studies=len(studies),
                    new_studies=added,
                )
        finally:
            assoc.release()

    def _associate(self, source: SourceConfig, context: Any) -> Any:
        return open_association(application_entity(self.config, context), source)

    def _find(self, assoc: Any, query: dict[str, str]) -> list[tuple[str, int | None]]:
        return [(uid, instances) for uid, _series, instances in find_studies(assoc, query)]

    # -- C-MOVE ---------------------------------------------------------------------------

    def _retrieve_studies(self, job_id: int, source: SourceConfig, project: ProjectConfig) -> None:
        """C-MOVE the job's pending studies, at most max_concurrent at once, the next one
        started pause_seconds after the last one ended; a cancel is seen within a second."""
        running: dict[Future, dict[str, Any]] = {}
        next_start = 0.0
        with ThreadPoolExecutor(source.max_concurrent, thread_name_prefix="pull") as pool:
            while not self.stop.is_set() and not self._cancelled(job_id):
                free = source.max_concurrent - len(running)
                if free > 0 and time.monotonic() >= next_start:
                    for study in self.store.due_pull_studies(job_id, free):
                        self.store.update_pull_study(study["id"], "retrieving")
                        future = pool.submit(self._retrieve_one, job_id, source, study, project)
                        running[future] = study
                if not running:
                    if not self.store.pull_studies_waiting(job_id):
                        return
                    # A pause between studies, or a study waiting for its backoff.
                    self.stop.wait(0.2)
                    continue
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    study = running.pop(future)
                    next_start = time.monotonic() + source.pause_seconds
                    exc = future.exception()
                    if exc is not None:
                        # _retrieve_one itself failed (its except path raised): the study
                        # must not stay 'retrieving' for ever.
                        self._retry_or_fail(study, study["attempts"] + 1, type(exc).__name__)
                        log.error(
                            "pull_study_crashed",
                            job_id=job_id,
                            study_uid=study["study_uid"],
                            **safe_error(exc),
                        )

    def _retrieve_one(
        self, job_id: int, source: SourceConfig, study: dict[str, Any], project: ProjectConfig
    ) -> None:
        attempts = study["attempts"] + 1
        started = time.monotonic()
        try:
            completed, failed = self._move(source, study["study_uid"], project)
            expected = study["expected"]
            if failed:
                raise PullError(f"C-MOVE: {failed} sub-operations failed, {completed} completed")
            if expected is not None and completed < expected:
                raise PullError(f"incomplete: {completed} of {expected} instances")
        except Exception as exc:
            reason = str(exc) if isinstance(exc, DeidNodeError) else type(exc).__name__
            self._retry_or_fail(study, attempts, reason)
            log.warning(
                "pull_study_failed",
                job_id=job_id,
                study_uid=study["study_uid"],
                attempt=attempts,
                final=attempts >= MAX_ATTEMPTS,
                **({"error": reason} if isinstance(exc, DeidNodeError) else safe_error(exc)),
            )
        else:
            self.store.update_pull_study(
                study["id"],
                "retrieved",
                attempts=attempts,
                completed=completed,
                failed=0,
                error=None,
            )
            log.info(
                "pull_study_retrieved",
                job_id=job_id,
                study_uid=study["study_uid"],
                instances=completed,
                seconds=round(time.monotonic() - started, 3),
            )
        self.wake.set()

    def _retry_or_fail(self, study: dict[str, Any], attempts: int, reason: str) -> None:
        """Back to 'pending' after a backoff, or 'failed' after MAX_ATTEMPTS."""
        if attempts < MAX_ATTEMPTS:
            self.store.update_pull_study(
                study["id"],
                "pending",
                attempts=attempts,
                next_at=backoff_until(attempts),
                error=reason,
            )
        else:
            self.store.update_pull_study(study["id"], "failed", attempts=attempts, error=reason)

    def _move(
        self, source: SourceConfig, study_uid: str, project: ProjectConfig
    ) -> tuple[int, int]:
        """C-MOVE (to the project's first called AE title, which the PACS must know: the node
        receives and routes what comes as any C-STORE) or C-GET (on this association, the
        instances handed to the SCP's own store handler, for this project only): (completed,
        failed) sub-operations."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        if source.retrieve == "get":
            name = "C-GET"
            assoc = self._associate_get(source, project)
            responses = assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)
        else:
            name = "C-MOVE"
            assoc = self._associate(source, StudyRootQueryRetrieveInformationModelMove)
            responses = assoc.send_c_move(
                ds, project.called_ae_titles[0], StudyRootQueryRetrieveInformationModelMove
            )
        completed = failed = 0
        final = None
        try:
            for status, _identifier in responses:
                if not status:
                    raise PullError(f"{name}: no answer (association aborted or timed out)")
                code = int(status.Status)
                completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
                failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
                warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
                if code != 0xFF00:
                    final = code
                    completed += warning
        finally:
            assoc.release()
        if final not in (0x0000, 0xB000):
            raise PullError(f"{name} status 0x{final or 0:04X}")
        return completed, failed

    def _associate_get(self, source: SourceConfig, project: ProjectConfig) -> Any:
        """A C-GET association: the Get context, storage contexts with us in the SCP role, and
        the SCP's handlers, so that what arrives takes the same path as a C-STORE to the node."""
        from pynetdicom import build_role
        from pynetdicom.presentation import StoragePresentationContexts

        from deid_node.routing import Router
        from deid_node.scp.ae import store_limits
        from deid_node.scp.handlers import Routes, handlers

        ae = application_entity(self.config, StudyRootQueryRetrieveInformationModelGet)
        # 128 presentation contexts at most: the Get context and 127 storage classes.
        storage = [cx.abstract_syntax for cx in StoragePresentationContexts[:127]]
        for uid in storage:
            ae.add_requested_context(uid)
        return open_association(
            ae,
            source,
            ext_neg=[build_role(uid, scp_role=True) for uid in storage],
            evt_handlers=handlers(
                self.store,
                store_limits(self.config.node),
                Routes(Router.from_config(self.config), only=(project.name,)),
            ),
        )
