"""One series through the stages: conditions -> deid.pixels -> deid.tags -> residual scan -> write.

Shared by the node, the batch CLI and the Python API; nothing here knows where files came from
or where they go next. The per-file work (`deidentify_file`) is a plain picklable function so
that it runs in worker processes (`deid_node.workers`): each process builds its pseudonymizer and
OCR model once.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from deid_node.conditions import (
    ConditionEvaluation,
    SaveDeidentifiedDicomCondition,
    evaluate_all,
)
from deid_node.config import DeidConfig, PixelsConfig
from deid_node.errors import DeidentificationError, InputError, ResidualIdentifierError
from deid_node.files import fsync_tree, write_durably
from deid_node.log import quiet_pydicom
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
from deid_node.report import build_report
from deid_node.workers import map_jobs

quiet_pydicom()  # worker processes import this module; they never configure logging

# A UID as it may safely name a folder: dot-separated digit components, at most 64 characters
# (PS3.5 9.1). Leading zeros, which some modalities send, are tolerated; empty components
# ("..", a leading or trailing dot) are not.
UID_PATTERN = re.compile(r"^(?=.{1,64}$)[0-9]+(\.[0-9]+)*$")

# Values larger than this are not read into memory when pixels stay untouched.
STREAM_VALUES_ABOVE = 1 << 20
PIXEL_DATA_TAG = 0x7FE00010

# Encapsulated PDF, CDA, STL, OBJ and MTL storage (PS3.4 Annex B): the document inside is not
# de-identified here, so such objects are quarantined or removed, never forwarded emptied.
ENCAPSULATED_DOCUMENT_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.104.{n}" for n in range(1, 6))
ENCAPSULATED_DOCUMENT_TAG = 0x00420011


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker process needs; picklable."""

    deid: DeidConfig
    pixels: PixelsConfig
    conditions: tuple[SaveDeidentifiedDicomCondition, ...]
    policy: SeriesPolicy
    secret: bytes = field(repr=False)
    # The node fsyncs outputs before a series moves on to forwarding (its state machine relies
    # on them); the batch mode writes plain files, like other de-identification tools: a run
    # that crashes is run again.
    durable: bool = True

    @property
    def retains_uids(self) -> bool:
        return not self.deid.redact_dicom_tags or "Retain UIDs" in self.deid.profile_options


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


@dataclass
class FileResult:
    source: SourceFile
    report: dict[str, Any]
    state: str  # processed | quarantined | skipped
    deid_path: Path | None = None
    sop_uid_deid: str | None = None
    error: str | None = None
    ocr_seconds: float | None = None  # DeidOutcome.ocr_seconds


@dataclass(frozen=True)
class DeidJob:
    src: Path
    dst_root: Path
    pixels_reviewed: bool = False  # released by an operator: no pixel review hold (console)


@dataclass(frozen=True)
class DeidOutcome:
    path: Path | None
    study_uid: str
    series_uid: str
    sop_uid: str
    pixels: dict[str, Any]
    error: str | None = None
    # Seconds of the pixel stage (decode, OCR, blanking) when OCR read the file: /metrics.
    ocr_seconds: float | None = None


@dataclass
class SeriesOutcome:
    results: list[FileResult]
    passed: bool
    summary: dict[str, Any]


# -- stage 1: conditions, on headers only ------------------------------------------------------


def read_dicom(path: Path, **kwargs: Any) -> Dataset:
    """dcmread, also for files without a Part 10 preamble and file meta (old archives, raw
    dataset dumps) when they parse as a DICOM dataset with SOP Class and Instance UIDs; their
    file meta is then made up from what was read, so that they are written as Part 10 files."""
    try:
        return dcmread(path, **kwargs)
    except InvalidDicomError:
        if not _starts_like_a_data_set(path):
            raise
    # Forced parsing of a file that only starts like a data set: large values stay on disk
    # (a garbage length must not become a gigabyte read).
    kwargs["defer_size"] = kwargs.get("defer_size") or STREAM_VALUES_ABOVE
    ds = dcmread(path, force=True, **kwargs)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not (UID_PATTERN.match(sop_class) and UID_PATTERN.match(sop_instance)):
        raise InvalidDicomError("no DICM prefix, and no SOP Class and Instance UIDs")
    meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), FileMetaDataset) else None
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    return ds


def _starts_like_a_data_set(path: Path) -> bool:
    """A raw data set starts with a tag of a low group (0002 file meta, 0008 identification...),
    little or big endian: anything else (a PDF, a video, a text) is not parsed by force."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if len(head) < 4:
        return False
    return min(struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]) <= 0x0020 and (
        head[:2] != b"\0\0"
    )


def read_header(path: Path) -> Dataset:
    """Read a file's header without pixel data; a clear InputError when it cannot be read.

    Any failure counts (a sequence nested thousands deep raises RecursionError, a malformed
    value anything): it refuses this file, never the batch. Only the error's type is kept, as
    library messages can quote values.
    """
    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - see above
        raise InputError(f"not a readable DICOM file: {type(exc).__name__}") from None
    return ds


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


# -- stage 2: de-identify one file (runs in a worker process) ----------------------------------


@functools.lru_cache(maxsize=4)
def _pseudonymizer(secret: bytes, prefix: str, lookup: Path | None) -> Any:
    from deid_node.deid.uids import Pseudonymizer

    return Pseudonymizer(secret, patient_id_prefix=prefix, lookup_table=lookup)


def pseudonymizer_for(settings: PipelineSettings) -> Any:
    return _pseudonymizer(
        settings.secret, settings.deid.patient_id_prefix, settings.deid.lookup_table
    )


def deidentify_file(job: DeidJob, settings: PipelineSettings) -> DeidOutcome:
    """Read one file, redact its pixels, de-identify its header, scan for residue, write it.

    The output path is `dst_root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm` with the new UIDs.
    Never raises for a bad file: the outcome carries an error without patient values.
    """
    from deid_node.deid.jpeg_markers import strip_pixel_data_markers
    from deid_node.deid.pixelcodec import unused_bits_possible
    from deid_node.deid.pixels import PixelReviewError, redact_pixels
    from deid_node.deid.tags import deidentify_tags, identifying_values, residual_scan

    no_text = settings.deid.redact_pixels_mode is DeidentifyRedactTextMode.REDACT_NO_TEXT
    try:
        # Pixels that stay untouched are not read into memory: large values are deferred and
        # the pixel data is copied from file to file (a 1 GiB cine costs no 1 GiB here).
        ds = read_dicom(job.src, defer_size=STREAM_VALUES_ABOVE if no_text else None)
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, decoder errors...
        return DeidOutcome(
            None, "", "", "", {}, error=f"not a readable DICOM file: {type(exc).__name__}"
        )
    uids = (
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("SOPInstanceUID", "")),
    )
    try:
        # Unused high bits may hold an overlay to clear: such pixel data is read, not streamed.
        streamed = _detach_pixel_data(ds) if no_text and not unused_bits_possible(ds) else None
        identifiers = identifying_values(ds, settings.deid)
        pixels_started = time.perf_counter()
        pixels = redact_pixels(
            ds,
            settings.deid.redact_pixels_mode,
            settings.pixels,
            identifiers,
            reviewed=job.pixels_reviewed,
        )
        ocr_seconds = _ocr_seconds(pixels, pixels_started)
        if settings.deid.redact_dicom_tags:
            strip_pixel_data_markers(ds)  # text in JPEG COM/APPn segments of the frames
            deidentify_tags(
                ds,
                settings.deid,
                pseudonymizer_for(settings),
                pixels_cleaned=pixels.changed,
                identifiers=identifiers,
            )
            hits = residual_scan(ds, identifiers)
            if hits:
                raise ResidualIdentifierError(
                    f"identifying value left in {', '.join(sorted(hits)[:5])}"
                )
        new = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        if not all(UID_PATTERN.match(uid) for uid in new):
            # They name the output folders: a malformed UID must not become a path.
            raise DeidentificationError("malformed Study/Series/SOP Instance UID")
        folder = job.dst_root / new[0] / new[1]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{new[2]}.dcm"
        # A name of its own per input: two inputs never share a temporary file.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{new[2]}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        write_durably(
            tmp,
            path,
            lambda handle: _save(ds, handle, job.src, streamed),
            sync_dir=False,
            fsync=settings.durable,
        )
        return DeidOutcome(path, *new, pixels=_pixel_summary(pixels), ocr_seconds=ocr_seconds)
    except PixelReviewError as exc:
        # Held for a person to look at: the report keeps frame 0's regions (coordinates only)
        # so that the console can show the image as it would leave, those regions blanked.
        return DeidOutcome(
            None,
            *uids,
            pixels={**_pixel_summary(exc.outcome), "review_regions": exc.outcome.regions},
            error=str(exc),
            ocr_seconds=_ocr_seconds(exc.outcome, pixels_started),
        )
    except DeidentificationError as exc:
        return DeidOutcome(None, *uids, pixels={}, error=str(exc))
    except Exception as exc:  # library errors can quote values: keep only the type
        return DeidOutcome(
            None,
            *uids,
            pixels={},
            error=f"de-identification failed: {type(exc).__name__}",
        )


@dataclass(frozen=True)
class _StreamedElement:
    """A native PixelData value left in the source file, to be copied after the header."""

    offset: int
    length: int
    vr: str
    implicit_vr: bool


def _detach_pixel_data(ds: Dataset) -> _StreamedElement | None:
    """Take a deferred, native PixelData out of `ds` if it can be streamed; else leave it."""
    raw = ds._dict.get(PIXEL_DATA_TAG)  # noqa: SLF001 - the raw element, not its value
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if (
        not isinstance(raw, RawDataElement)
        or raw.value is not None  # small enough to have been read: the usual path
        or raw.length in (None, 0xFFFFFFFF)  # encapsulated: not streamed
        or syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        or max(ds.keys()) != PIXEL_DATA_TAG  # something after it (padding, signatures)
    ):
        return None
    streamed = _StreamedElement(
        raw.value_tell, raw.length, raw.VR or "OW", syntax == ImplicitVRLittleEndian
    )
    del ds[PIXEL_DATA_TAG]
    return streamed


def _detach_pixel_bytes(ds: Dataset) -> tuple[_StreamedElement, bytes] | None:
    """Take a native PixelData held in memory, the last element, out of `ds`: written after the
    header in one write, where pydicom's writer copies it through two buffers (a third of the
    time to write a 512 KB CT)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if (
        PIXEL_DATA_TAG not in ds
        or syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        or max(ds.keys()) != PIXEL_DATA_TAG
    ):
        return None
    elem = ds[PIXEL_DATA_TAG]
    value = elem.value
    if (
        not isinstance(value, bytes)
        or len(value) % 2
        or elem.is_undefined_length
        or (syntax == ExplicitVRLittleEndian and elem.VR not in ("OB", "OW"))
    ):
        return None
    del ds[PIXEL_DATA_TAG]
    return _StreamedElement(0, len(value), elem.VR, syntax == ImplicitVRLittleEndian), value


def _save(ds: Dataset, handle: Any, src: Path, streamed: _StreamedElement | None) -> None:
    in_memory = _detach_pixel_bytes(ds) if streamed is None else None
    ds.save_as(handle, enforce_file_format=True)
    if in_memory is not None:
        handle.write(_element_header(in_memory[0]))
        handle.write(in_memory[1])
        return
    if streamed is None:
        return
    # PixelData is the last element: append its header and copy its value from the source.
    handle.write(_element_header(streamed))
    with src.open("rb") as source:
        source.seek(streamed.offset)
        remaining = streamed.length
        while remaining:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                raise InputError("pixel data shorter than its declared length")
            handle.write(chunk)
            remaining -= len(chunk)


def _element_header(element: _StreamedElement) -> bytes:
    """The tag, VR (explicit VR) and length of a PixelData element, little endian."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if element.implicit_vr:
        return tag + struct.pack("<I", element.length)
    return tag + element.vr.encode() + b"\x00\x00" + struct.pack("<I", element.length)


def _ocr_seconds(outcome: Any, started: float) -> float | None:
    return round(time.perf_counter() - started, 4) if outcome.engine else None


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


def _pixel_summary(outcome: Any) -> dict[str, Any]:
    return {
        "mode": str(outcome.mode),
        "changed": bool(outcome.changed),
        "frames": outcome.frames,
        "boxes": outcome.boxes,
        "engine": outcome.engine,
        "reasons": list(outcome.reasons),
        "changed_fraction": outcome.changed_fraction,
        "unused_bits_cleared": outcome.unused_bits_cleared,
    }


# -- the series --------------------------------------------------------------------------------


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


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
