"""The series: judged, de-identified where it may leave, every file's report built, the
summary (outcome, counts, pixel-stage seconds) made."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deid_node.files import fsync_tree
from deid_node.modes import SeriesPolicy
from deid_node.pipeline.deidentify import (
    DeidJob,
    DeidOutcome,
    PipelineSettings,
    deidentify_file,
    pseudonymizer_for,
)
from deid_node.pipeline.judge import FileEvaluation, SourceFile, evaluate_file, judge_series
from deid_node.report import build_report
from deid_node.workers import map_jobs


@dataclass
class FileResult:
    source: SourceFile
    report: dict[str, Any]
    state: str  # processed | quarantined | skipped
    deid_path: Path | None = None
    sop_uid_deid: str | None = None
    error: str | None = None
    ocr_seconds: float | None = None  # DeidOutcome.ocr_seconds


@dataclass
class SeriesOutcome:
    results: list[FileResult]
    passed: bool
    summary: dict[str, Any]


# Upper bounds (seconds) the pixel stage's time per file is counted into in a series' summary
# (`ocr_seconds`): /metrics adds them up over series, one row per series, not per file.
OCR_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def seconds_histogram(values: Sequence[float]) -> dict[str, Any]:
    """{"count", "sum", "buckets": {upper bound: files at or under it}} of `values`."""
    return {
        "count": len(values),
        "sum": round(sum(values), 4),
        "buckets": {str(b): sum(v <= b for v in values) for b in OCR_SECONDS_BUCKETS},
    }


def run_series(
    sources: Sequence[SourceFile],
    settings: PipelineSettings,
    dst_root: Path,
    *,
    executor: Executor | None = None,
    earlier: Sequence[dict[str, Any]] = (),
    url_for_output: Callable[[Path], str] = str,
    extra: Callable[[SourceFile], dict[str, Any]] | None = None,
    on_file_done: Callable[[FileResult], None] | None = None,
) -> SeriesOutcome:
    """Judge the series, de-identify what may leave, and build every file's report."""
    started = time.monotonic()
    evaluations = [evaluate_file(s, settings.conditions, settings.deid) for s in sources]
    series_passed, disabling, send = judge_series(evaluations, settings.policy, earlier)
    jobs = [
        DeidJob(e.source.path, dst_root, e.source.pixels_reviewed)
        for e, go in zip(evaluations, send, strict=True)
        if go
    ]
    deidentify = functools.partial(deidentify_file, settings=settings)
    outcomes = map_jobs(deidentify, jobs, executor, _failed)
    keys = pseudonymizer_for(settings) if not settings.retains_uids else None

    results: list[FileResult] = []
    for evaluation, go in zip(evaluations, send, strict=True):
        outcome = next(outcomes) if go else None
        result = _file_result(
            evaluation, outcome, keys, series_passed, disabling, url_for_output, extra
        )
        results.append(result)
        if on_file_done:
            on_file_done(result)

    if settings.durable:
        fsync_tree((r.deid_path for r in results if r.deid_path is not None), dst_root)
    quarantined = sum(r.state == "quarantined" for r in results)
    if quarantined and settings.policy is SeriesPolicy.ALL:
        # A series leaves whole or not at all: one file we could not de-identify holds it back.
        for r in results:
            if r.deid_path is not None:
                r.deid_path.unlink(missing_ok=True)
                r.deid_path = None
                r.report["url_deid"] = None
                r.report["withheld"] = WITHHELD_QUARANTINE
    written = sum(r.deid_path is not None for r in results)
    if quarantined and written == 0:
        outcome_name = "failed"
    elif evaluations and all(e.left_out for e in evaluations):
        outcome_name = "left_out"  # duplicates refused, documents removed: nothing to send
    else:
        outcome_name = "passed" if series_passed else "rejected"
    summary = {
        "files": len(results),
        "passed_conditions": sum(e.passed for e in evaluations),
        "written": written,
        "quarantined": quarantined,
        "outcome": outcome_name,
        "duration_s": round(time.monotonic() - started, 3),
    }
    ocr = [r.ocr_seconds for r in results if r.ocr_seconds is not None]
    if ocr:
        summary["ocr_seconds"] = seconds_histogram(ocr)
    return SeriesOutcome(results, series_passed, summary)


WITHHELD_QUARANTINE = 'series policy "all": another file of the series failed de-identification'
WITHHELD_CONDITIONS = (
    'series policy "all": another file of the series did not pass its save conditions or could'
    " not be read (see save_disabling_urls_series_agg)"
)


def _failed(reason: str) -> DeidOutcome:
    """The outcome of a file whose worker process failed (`workers.map_jobs`)."""
    return DeidOutcome(None, "", "", "", {}, error=reason)


def _file_result(
    evaluation: FileEvaluation,
    outcome: DeidOutcome | None,
    keys: Any,
    series_passed: bool,
    disabling: list[str],
    url_for_output: Callable[[Path], str],
    extra: Callable[[SourceFile], dict[str, Any]] | None,
) -> FileResult:
    def mapped(uid: str | None) -> str | None:
        return keys.uid(uid) if (uid and keys is not None) else uid

    study_deid = mapped(evaluation.study_uid)
    series_deid = mapped(evaluation.series_uid)
    sop_deid = mapped(evaluation.sop_uid)
    error = evaluation.error
    state = "skipped"
    deid_path = None
    pixels = None
    withheld = None
    removed = None
    if evaluation.left_out is not None:
        if evaluation.source.refusal:
            error = evaluation.left_out
        else:
            removed = evaluation.left_out
    elif outcome is not None:
        if outcome.error:
            error, state = outcome.error, "quarantined"
            pixels = outcome.pixels or None  # what the redaction would have changed
        else:
            state, deid_path = "processed", outcome.path
            study_deid, series_deid, sop_deid = (
                outcome.study_uid,
                outcome.series_uid,
                outcome.sop_uid,
            )
            pixels = outcome.pixels
    elif error:
        state = "quarantined"
    elif evaluation.passed and not series_passed:
        withheld = WITHHELD_CONDITIONS
    report = build_report(
        url=evaluation.source.url,
        study_uid=evaluation.study_uid,
        study_uid_deid=study_deid,
        series_uid=evaluation.series_uid,
        series_uid_deid=series_deid,
        evaluations=evaluation.evaluations,
        save_condition=evaluation.passed,
        series_agg=series_passed,
        disabling_urls=[] if series_passed else disabling,
        url_deid=url_for_output(deid_path) if deid_path else None,
        SOPInstanceUID=evaluation.sop_uid,
        SOPInstanceUID_deid=sop_deid,
        error=error,
        removed=removed,
        withheld=withheld,
        pixels=pixels,
        **(extra(evaluation.source) if extra else {}),
    )
    return FileResult(
        evaluation.source,
        report,
        state,
        deid_path,
        sop_deid,
        error,
        outcome.ocr_seconds if outcome is not None else None,
    )
