"""Stage 1, on headers only: each file against the save conditions, then the series judged
as a whole (with the reports of its earlier rounds) under its policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from deid_node.conditions import (
    ConditionEvaluation,
    SaveDeidentifiedDicomCondition,
    evaluate_all,
)
from deid_node.config import DeidConfig
from deid_node.errors import InputError
from deid_node.modes import SeriesPolicy
from deid_node.pipeline.dicomfile import read_header

# Encapsulated PDF, CDA, STL, OBJ and MTL storage (PS3.4 Annex B): the document inside is not
# de-identified here, so such objects are quarantined or removed, never forwarded emptied.
ENCAPSULATED_DOCUMENT_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.104.{n}" for n in range(1, 6))
ENCAPSULATED_DOCUMENT_TAG = 0x00420011


@dataclass(frozen=True)
class SourceFile:
    url: str  # how the report names it: dicom://AE/SOPUID, a path, file://...
    path: Path
    key: Any = None  # the caller's handle (instance id in the node)
    header: Dataset | None = field(default=None, compare=False, repr=False)  # if already read
    # Set by a front door that refuses the file before the series is judged (a duplicate
    # SOPInstanceUID in a batch): reported with this reason, never de-identified, and not held
    # against its series.
    refusal: str | None = None
    # Released by an operator after looking at the image (console): the pixel review holds
    # (BurnedInAnnotation without text found, max_redacted_fraction) are waived.
    pixels_reviewed: bool = False


@dataclass
class FileEvaluation:
    source: SourceFile
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    evaluations: list[ConditionEvaluation] = field(default_factory=list)
    error: str | None = None
    # Left out of the series on purpose (a refusal, a removed encapsulated document): reported,
    # not sent, and not held against the other files.
    left_out: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.left_out is None
            and all(e.evaluated_value for e in self.evaluations)
        )

    @property
    def holds_series_back(self) -> bool:
        return self.left_out is None and not self.passed


def is_encapsulated_document(ds: Dataset) -> bool:
    return (
        str(ds.get("SOPClassUID", "")) in ENCAPSULATED_DOCUMENT_CLASSES
        or ENCAPSULATED_DOCUMENT_TAG in ds
    )


def evaluate_file(
    source: SourceFile,
    conditions: Sequence[SaveDeidentifiedDicomCondition],
    deid: DeidConfig | None = None,
) -> FileEvaluation:
    if source.refusal:
        result = FileEvaluation(source, left_out=source.refusal)
        if source.header is not None:
            _set_uids(result, source.header)
        return result
    try:
        ds = source.header if source.header is not None else read_header(source.path)
        result = FileEvaluation(source)
        _set_uids(result, ds)
        if not result.series_uid or not result.sop_uid:
            result.error = "missing SeriesInstanceUID or SOPInstanceUID"
        result.evaluations = evaluate_all(conditions, ds)
        if result.error is None and is_encapsulated_document(ds):
            if deid is not None and deid.encapsulated_documents == "remove":
                result.left_out = (
                    "encapsulated document: removed from the series (deid.encapsulated_documents"
                    ' = "remove")'
                )
            else:
                result.error = "encapsulated document"
        return result
    except InputError as exc:
        return FileEvaluation(source, error=str(exc))
    except Exception as exc:  # a malformed value deep in a header must not stop a series
        return FileEvaluation(source, error=f"cannot evaluate: {type(exc).__name__}")


def _set_uids(result: FileEvaluation, ds: Dataset) -> None:
    result.study_uid = _str_or_none(ds.get("StudyInstanceUID"))
    result.series_uid = _str_or_none(ds.get("SeriesInstanceUID"))
    result.sop_uid = _str_or_none(ds.get("SOPInstanceUID"))


def judge_series(
    evaluations: Sequence[FileEvaluation],
    policy: SeriesPolicy,
    earlier: Sequence[dict[str, Any]] = (),
) -> tuple[bool, list[str], list[bool]]:
    """Aggregate per series: (series passes, urls that made it fail, send-this-file flags).

    `earlier` are reports of earlier rounds of the same series: late files are judged with the
    whole series, so a series rejected once stays rejected under policy "all".
    """
    # An earlier file that failed its conditions, or could not be de-identified, holds the
    # series back as much as one of this round; one removed on purpose (its report's
    # `removed`, save_condition false) does not, as it does not in its own round.
    disabling = [
        r["url"]
        for r in earlier
        if not r.get("removed") and (not r.get("save_condition") or r.get("error"))
    ]
    disabling += [e.source.url for e in evaluations if e.holds_series_back]
    series_passed = not disabling
    if policy is SeriesPolicy.ALL:
        send = [series_passed and e.left_out is None for e in evaluations]
    else:
        send = [e.passed for e in evaluations]
    return series_passed, disabling, send


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
