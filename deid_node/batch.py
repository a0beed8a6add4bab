"""The batch front door: files and folders on disk through the same pipeline as the node.

Used by `deid-node deidentify` and by the Python API (`deidentify_dicom_files`).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from deid_node.errors import InputError, UnsupportedSchemeError
from deid_node.log import get_logger
from deid_node.pipeline import FileResult, PipelineSettings, SourceFile, read_header, run_series

log = get_logger("deid_node.batch")


@dataclass
class BatchResult:
    reports: list[dict[str, Any]]
    skipped_non_dicom: int = 0
    series_passed: int = 0
    series_failed: int = 0
    files_written: int = 0
    duration_s: float = 0.0
    skipped_paths: list[str] = field(default_factory=list)

    def summary_line(self) -> str:
        return (
            f"series passed {self.series_passed}, failed {self.series_failed}; "
            f"files written {self.files_written} of {len(self.reports)}; "
            f"non-DICOM skipped {self.skipped_non_dicom}; {self.duration_s:.1f} s"
        )


def path_from_url(url: str | os.PathLike[str]) -> Path:
    """A local path from a path or file:// URL; other schemes raise naming the scheme."""
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and text[1:3] in (":\\", ":/")):
        return Path(unquote(parsed.path) if parsed.scheme == "file" else text)
    raise UnsupportedSchemeError(
        f"unsupported URL scheme {parsed.scheme!r} in dicom_urls: only local paths and file:// are "
        "supported (object storage needs an adapter that downloads to a local folder first)"
    )


def looks_like_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at offset 128; anything else is skipped, not guessed."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def collect_sources(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[SourceFile], list[str]]:
    """Expand files and folders (recursively) into sources; return (dicom sources, skipped)."""
    sources: list[SourceFile] = []
    skipped: list[str] = []
    for given in inputs:
        root = path_from_url(given)
        if root.is_dir():
            candidates = [(str(p), p) for p in sorted(root.rglob("*")) if p.is_file()]
        elif root.is_file():
            candidates = [(os.fspath(given), root)]
        else:
            raise InputError(f"no such file or folder: {os.fspath(given)}")
        for url, path in candidates:
            if looks_like_dicom(path):
                sources.append(SourceFile(url, path))
            else:
                skipped.append(url)
    return sources, skipped


def group_by_series(sources: Sequence[SourceFile]) -> list[list[SourceFile]]:
    """Group by SeriesInstanceUID; unreadable files form groups of one (reported with an error)."""
    groups: dict[str, list[SourceFile]] = defaultdict(list)
    for index, source in enumerate(sources):
        try:
            header = read_header(source.path)
            series_uid = str(header.get("SeriesInstanceUID", "") or "")
            source = replace(source, header=header)  # read once: conditions use it too
        except InputError:
            series_uid = ""
        groups[series_uid or f"unreadable:{index}"].append(source)
    return list(groups.values())


class Progress:
    """files done / total, rate, ETA: a bar on a terminal, a log line per series otherwise."""

    def __init__(self, total: int, *, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty() if enabled is None else enabled

    def advance(self, _result: FileResult | None = None) -> None:
        self.done += 1
        if self.tty:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0.0
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:.1f} files/s ETA {eta:.0f}s"
            )
            sys.stderr.flush()

    def series_done(self, series_uid: str | None, summary: dict[str, Any]) -> None:
        if not self.tty:
            log.info(
                "series_processed",
                series_uid=series_uid,
                done=self.done,
                total=self.total,
                **summary,
            )

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_batch(
    inputs: Iterable[str | os.PathLike[str]],
    out_dir: Path,
    settings: PipelineSettings,
    *,
    executor: Executor | None = None,
    progress: bool | None = None,
    on_series: Callable[[list[dict[str, Any]]], None] | None = None,
) -> BatchResult:
    started = time.monotonic()
    sources, skipped = collect_sources(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(sources), enabled=progress)
    result = BatchResult(reports=[], skipped_non_dicom=len(skipped), skipped_paths=skipped)
    for group in group_by_series(sources):
        outcome = run_series(group, settings, out_dir, executor=executor, on_file_done=bar.advance)
        reports = [r.report for r in outcome.results]
        result.reports.extend(reports)
        result.files_written += outcome.summary["written"]
        if outcome.summary["outcome"] == "passed":
            result.series_passed += 1
        else:
            result.series_failed += 1
        bar.series_done(reports[0].get("SeriesInstanceUID") if reports else None, outcome.summary)
        if on_series:
            on_series(reports)
    bar.close()
    result.duration_s = time.monotonic() - started
    return result
