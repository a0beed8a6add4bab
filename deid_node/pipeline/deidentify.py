"""Stage 2, one file (in a worker process): pixels redacted, header de-identified, residue
scanned, written under its new UIDs."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from deid_node.conditions import SaveDeidentifiedDicomCondition
from deid_node.config import DeidConfig, PixelsConfig
from deid_node.errors import DeidentificationError, ResidualIdentifierError
from deid_node.files import write_durably
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
from deid_node.pipeline.dicomfile import (
    STREAM_VALUES_ABOVE,
    UID_PATTERN,
    _detach_pixel_data,
    _save,
    read_dicom,
)


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


@functools.lru_cache(maxsize=4)
def _pseudonymizer(secret: bytes, prefix: str, lookup: Path | None) -> Any:
    from deid_node.deid.uids import Pseudonymizer

    return Pseudonymizer(secret, patient_id_prefix=prefix, lookup_table=lookup)


def pseudonymizer_for(settings: PipelineSettings) -> Any:
    return _pseudonymizer(
        settings.secret, settings.deid.patient_id_prefix, settings.deid.lookup_table
    )


def deidentify_file(
    job: DeidJob,
    settings: PipelineSettings,
    on_read: Callable[[Dataset], None] | None = None,
) -> DeidOutcome:
    """Read one file, redact its pixels, de-identify its header, scan for residue, write it.

    The output path is `dst_root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm` with the new UIDs.
    Never raises for a bad file: the outcome carries an error without patient values.
    `on_read` is called with the file as read, before anything in it changes (the batch takes
    what the series is judged on from it: each file is parsed once).
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
        if on_read is not None:
            on_read(ds)
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
        # A name of its own per input: two inputs never share a temporary file (a thread
        # writes one file at a time; two writing the same new SOP Instance UID differ by
        # process or thread). Cheaper than mkstemp's random name, create, close and reopen.
        tmp = folder / f".{new[2]}.{os.getpid()}.{threading.get_ident()}.part"
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


def _ocr_seconds(outcome: Any, started: float) -> float | None:
    return round(time.perf_counter() - started, 4) if outcome.engine else None


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
