"""pipeline.judge_series across rounds: an earlier file removed on purpose (an encapsulated
document under deid.encapsulated_documents = "remove") does not hold later rounds back."""

from __future__ import annotations

from pathlib import Path

from deid_node.modes import SeriesPolicy
from deid_node.pipeline import FileEvaluation, SourceFile, _file_result, judge_series


def report(evaluation: FileEvaluation) -> dict:
    """The report the node stored for it in its round (the real report builder)."""
    passed, disabling, _ = judge_series([evaluation], SeriesPolicy.ALL)
    return _file_result(evaluation, None, None, passed, disabling, str, None).report


def evaluation(url: str, **fields) -> FileEvaluation:
    return FileEvaluation(SourceFile(url, Path(url)), series_uid="1.2.3", sop_uid=url, **fields)


def test_an_earlier_removed_document_does_not_hold_later_rounds_back():
    removed = report(evaluation("pdf", left_out="encapsulated document: removed"))
    assert removed["removed"] and removed["save_condition"] is False
    passed, disabling, send = judge_series([evaluation("ct2")], SeriesPolicy.ALL, [removed])
    assert (passed, disabling, send) == (True, [], [True])


def test_an_earlier_file_that_failed_still_holds_later_rounds_back():
    failed = report(evaluation("ct1", error="cannot evaluate: KeyError"))
    passed, disabling, send = judge_series([evaluation("ct2")], SeriesPolicy.ALL, [failed])
    assert (passed, disabling, send) == (False, ["ct1"], [False])
