"""The per-file report, in the format of Encord's `deidentify_dicom_files` output.

Encord keys, always present and in this order: url, StudyInstanceUID, StudyInstanceUID_deid,
SeriesInstanceUID, SeriesInstanceUID_deid, save_conditions_evaluations, save_condition,
save_condition_series_agg, save_disabling_urls_series_agg, url_deid. Our extra keys follow.
No field carries a patient value other than the original UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deid_node.conditions import ConditionEvaluation

ENCORD_KEYS = (
    "url",
    "StudyInstanceUID",
    "StudyInstanceUID_deid",
    "SeriesInstanceUID",
    "SeriesInstanceUID_deid",
    "save_conditions_evaluations",
    "save_condition",
    "save_condition_series_agg",
    "save_disabling_urls_series_agg",
    "url_deid",
)


def build_report(
    *,
    url: str,
    study_uid: str | None,
    study_uid_deid: str | None,
    series_uid: str | None,
    series_uid_deid: str | None,
    evaluations: Sequence[ConditionEvaluation],
    save_condition: bool,
    series_agg: bool,
    disabling_urls: Sequence[str],
    url_deid: str | None,
    **extra: Any,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "url": url,
        "StudyInstanceUID": study_uid,
        "StudyInstanceUID_deid": study_uid_deid,
        "SeriesInstanceUID": series_uid,
        "SeriesInstanceUID_deid": series_uid_deid,
        "save_conditions_evaluations": [e.to_dict() for e in evaluations],
        "save_condition": save_condition,
        "save_condition_series_agg": series_agg,
        "save_disabling_urls_series_agg": list(disabling_urls),
        "url_deid": url_deid,
    }
    report.update({k: v for k, v in extra.items() if v is not None})
    return report


def unprocessed_report(
    *,
    url: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The report of a file that was never judged nor de-identified (refused at receive, no
    project took it, unreadable in a batch run): nothing de-identified, nothing sent; `extra`
    says why (`error`, ...)."""
    return build_report(
        url=url,
        study_uid=study_uid,
        study_uid_deid=None,
        series_uid=series_uid,
        series_uid_deid=None,
        evaluations=[],
        save_condition=False,
        series_agg=False,
        disabling_urls=[],
        url_deid=None,
        **extra,
    )
