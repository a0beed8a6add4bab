"""Burned-in text in pixel data: blank the text that deid/textscan.py finds, and only text; say
how much changed.

REDACT_NO_TEXT never decodes; it only clears unused high bits of native pixel data, where old
devices drew overlays. Otherwise every frame is decoded (pixelcodec), mapped to the 8-bit image
a viewer would show, and read by the OCR engine (textscan: a box is text only when the
recognizer reads characters in it with confidence; detectors take vessels, vertebrae, sulci and
CT edges for strokes). Text boxes are filled with the colour around them; REDACT_SENSITIVE_TEXT
fills only those the classifier calls identifying (and line parts it could not read). Pixels
are written back when something was blanked or unused bits were set.

Fail closed, exactly: PixelError (the instance is quarantined, never forwarded) when the image
cannot be scanned (float or 1-bit data, an encoding we cannot decode, named in the reason), when
blanking would change more than `max_redacted_fraction` of a frame (anatomy taken for text,
or a screen of text: a person decides), and when the header says BurnedInAnnotation YES but
neither OCR nor a template finds any text in ALL or SENSITIVE mode.

BurnedInAnnotation: after REDACT_ALL_TEXT it is set to "NO" -- that mode leaves no text the
recognizer can read. REDACT_SENSITIVE_TEXT and REDACT_NO_TEXT leave it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil

import numpy as np
from pydicom import Dataset
from pydicom.uid import AllTransferSyntaxes

from deid_node.config import PixelsConfig, RegionTemplate
from deid_node.deid.pixelcodec import (
    Decoded,
    DisplayMapper,
    clear_unused_bits,
    decode,
    fill_value,
    frame_count,
    has_float_pixels,
    syntax_label,
    transfer_syntax,
    unused_bits_set,
    write_back,
)
from deid_node.deid.sensitive import SensitiveTextClassifier
from deid_node.deid.textscan import LINE_END_PAD as _LINE_END_PAD
from deid_node.deid.textscan import scan_frames
from deid_node.errors import PixelError
from deid_node.modes import DeidentifyRedactTextMode
from deid_node.ocr import TextBox, get_engine

# A pixel counts as changed when its displayed value moved by more than this (of 255): blanking
# near-black background (JPEG noise around US text) changes nothing anyone can see.
_VISIBLE_CHANGE = 24
_RING = 3
# Frames that share their boxes are filled together, at most this many at a time, and at most
# as many as keep _BLANK_RUN_PIXELS of their boxes' bounding rectangle (its values before and
# after, and a mask over it, are held for every frame of the run): a run of large boxes on
# large frames holds about what one frame did (a 4096x4096 frame with a box over it: one frame).
_BLANK_RUN_FRAMES = 16
_BLANK_RUN_PIXELS = 1 << 22


@dataclass
class PixelOutcome:
    changed: bool  # text blanked in the pixel data
    frames: int
    boxes: int
    engine: str | None
    mode: str
    reasons: list[str] = field(default_factory=list)  # categories only, never patient values
    changed_fraction: float = 0.0  # of a frame's pixels visibly changed; max over frames
    unused_bits_cleared: bool = False  # bits above BitsStored were set and are now clear
    # Frame 0's rectangles (x, y, w, h) as blanking fills them (padded, clipped): shown to the
    # person reviewing an image held for review (console), coordinates only, never text.
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)


class PixelReviewError(PixelError):
    """A person must look at the image before it may leave (a review hold): carries what the
    redaction found, frame 0's regions included, for the console to show."""

    def __init__(self, message: str, outcome: PixelOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class RedactionLimitError(PixelReviewError):
    """Blanking would change more of a frame than `pixels.max_redacted_fraction` allows."""


def redact_pixels(
    ds: Dataset,
    mode: DeidentifyRedactTextMode,
    config: PixelsConfig,
    identifiers: Sequence[str] = (),
    reviewed: bool = False,
) -> PixelOutcome:
    """Find and blank burned-in text in `ds` in place, as `mode` asks; raise PixelError if the
    pixel data cannot be decoded or written back, or must be reviewed by a person (the
    instance must then not be forwarded). reviewed: an operator looked at this image and
    released it (console): the two review holds are waived, the redaction still runs."""
    mode = DeidentifyRedactTextMode(mode)
    reasons: list[str] = []
    burned_in = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
    if burned_in:
        reasons.append("burned_in_annotation=YES")
    syntax = transfer_syntax(ds)
    if "PixelData" in ds and syntax not in AllTransferSyntaxes:
        # Newer than our pydicom (Deflated Image Frame, JPEG XL ...): it can neither decode
        # the pixels nor write the file back, in any mode. Not `syntax.is_transfer_syntax`:
        # importing pynetdicom registers these UIDs, which made the answer depend on imports.
        raise PixelError(f"unsupported pixel data encoding {syntax_label(syntax)}")
    if mode is DeidentifyRedactTextMode.REDACT_NO_TEXT:
        cleared = clear_unused_bits(ds) > 0
        if cleared:
            reasons.append("unused_bits_cleared")
        return PixelOutcome(
            False, frame_count(ds), 0, None, mode.value, reasons, unused_bits_cleared=cleared
        )
    if has_float_pixels(ds):
        raise PixelError("float pixel data cannot be scanned for burned-in text")
    if "PixelData" not in ds:
        return PixelOutcome(False, 0, 0, None, mode.value, [*reasons, "no_pixel_data"])

    dirty_bits = unused_bits_set(ds) > 0
    decoded = decode(ds)  # unused bits masked by the decoder
    count = decoded.frames.shape[0]
    template_boxes: list[TextBox] = []
    for template in _matching_templates(ds, config.templates):
        reasons.append(f"template:{template.manufacturer}/{template.model}")
        template_boxes.extend(TextBox(x, y, w, h) for x, y, w, h in template.regions)

    engine = get_engine(config.ocr_engine, config.device)
    classifier = (
        SensitiveTextClassifier(identifiers)
        if mode is DeidentifyRedactTextMode.REDACT_SENSITIVE_TEXT
        else None
    )
    display = DisplayMapper(ds, decoded)
    fill = fill_value(ds, decoded)
    frame_boxes, read, how = scan_frames(decoded, display, engine, classifier, config)
    reasons.extend(how)
    if classifier is not None:
        categories = sorted({b.text for boxes in frame_boxes for b in boxes if b.text})
        reasons.extend(f"sensitive:{c}" for c in categories)
    if reviewed:
        reasons.append("released_after_review")
    elif burned_in and read == 0 and not template_boxes:
        raise PixelReviewError(
            "BurnedInAnnotation is YES but OCR read no text and no template matches: "
            "held for review",
            PixelOutcome(False, count, 0, engine.name, mode.value, reasons),  # no region
        )

    total, fraction = _blank(decoded, display, frame_boxes, template_boxes, fill, config.margin_px)
    outcome = PixelOutcome(
        total > 0, count, total, engine.name, mode.value, reasons, round(fraction, 6)
    )
    outcome.regions = _frame_regions(
        frame_boxes[0], template_boxes, config.margin_px, *decoded.frames.shape[1:3]
    )
    if fraction > config.max_redacted_fraction and not reviewed:
        raise RedactionLimitError(
            f"redaction would change {fraction:.1%} of a frame's pixels, more than "
            f"pixels.max_redacted_fraction {config.max_redacted_fraction:.1%}: held for review",
            outcome,
        )
    if dirty_bits:
        reasons.append("unused_bits_cleared")
        outcome.unused_bits_cleared = True
    if total == 0 and not dirty_bits:
        return outcome
    write_back(ds, decoded)
    if total and mode is DeidentifyRedactTextMode.REDACT_ALL_TEXT:
        ds.BurnedInAnnotation = "NO"
    return outcome


def _blank(
    decoded: Decoded,
    display: DisplayMapper,
    frame_boxes: list[list[TextBox]],
    template_boxes: list[TextBox],
    fill: np.ndarray | int,
    margin: int,
) -> tuple[int, float]:
    """Fill every box in place; (boxes filled, largest share of a frame's pixels whose
    displayed value changed visibly).

    A text box is filled with the colour around it (the median of a ring just outside it), so
    text on a flat bar or on black leaves no black rectangle and changes only its glyphs'
    pixels; a template region, or a box with nothing around it, with display-black. Frames
    that share their boxes (a cine whose text was found once) are filled together, up to
    _BLANK_RUN_FRAMES at a time, each with its own ring colours.
    """
    total = 0
    worst = 0.0
    frames = decoded.frames
    count = frames.shape[0]
    palette = decoded.photometric == "PALETTE COLOR"
    height, width = frames.shape[1:3]
    start = 0
    while start < count:
        boxes = frame_boxes[start]
        rects = _fill_rects(boxes, template_boxes, margin, height, width)
        most = max(1, min(_BLANK_RUN_FRAMES, _BLANK_RUN_PIXELS // max(1, _span(rects))))
        stop = start + 1
        while stop < count and stop - start < most and frame_boxes[stop] == boxes:
            stop += 1
        total += (len(boxes) + len(template_boxes)) * (stop - start)
        if rects:
            run = slice(start, stop)
            worst = max(worst, _fill_run(frames, display, run, rects, fill, palette))
        start = stop
    return total, worst


def _fill_rects(
    boxes: Sequence[TextBox], templates: Sequence[TextBox], margin: int, height: int, width: int
) -> list[tuple[int, int, int, int, bool]]:
    """(x0, y0, x1, y1, is_template) of what _blank fills in one frame: text boxes padded
    (line ends by LINE_END_PAD of their height), template regions as they are, clipped to the
    frame, empty ones left out; template regions last, so display-black wins over a ring fill
    that overlaps them."""
    out = []
    for box, mx, my, template in [
        *((b, max(margin, ceil(_LINE_END_PAD * b.h)), margin, False) for b in boxes),
        *((b, 0, 0, True) for b in templates),
    ]:
        x0, y0 = max(0, box.x - mx), max(0, box.y - my)
        x1, y1 = min(width, box.x + box.w + mx), min(height, box.y + box.h + my)
        if x1 > x0 and y1 > y0:
            out.append((int(x0), int(y0), int(x1), int(y1), template))
    return out


def _fill_run(
    frames: np.ndarray,
    display: DisplayMapper,
    run: slice,
    rects: list[tuple[int, int, int, int, bool]],
    fill: np.ndarray | int,
    palette: bool,
) -> float:
    """Fill `rects` in each frame of `run`; the largest share of one frame's pixels whose
    displayed value changed visibly. Only the rectangles are read and compared."""
    block = frames[run]  # a view: filled in place
    n, height, width = block.shape[:3]
    before = [display.region(run, x0, y0, x1, y1).astype(np.int16) for x0, y0, x1, y1, _ in rects]
    # Every ring is read from the original before any box is filled.
    rings = [
        None if template else _ring_values(block, x0, y0, x1, y1, palette)
        for x0, y0, x1, y1, template in rects
    ]
    for (x0, y0, x1, y1, _), ring in zip(rects, rings, strict=True):
        block[:, y0:y1, x0:x1] = fill if ring is None else ring[:, None, None]
    # Changed pixels per frame, over the rectangles' bounding rectangle only (overlapping
    # rectangles count their shared pixels once).
    ux0, uy0, ux1, uy1 = _bounds(rects)
    changed = np.zeros((n, uy1 - uy0, ux1 - ux0), bool)
    for (x0, y0, x1, y1, _), old in zip(rects, before, strict=True):
        after = display.region(run, x0, y0, x1, y1).astype(np.int16)
        diff = np.abs(after - old) > _VISIBLE_CHANGE
        changed[:, y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0] |= (
            diff.any(axis=3) if diff.ndim == 4 else diff
        )
    return int(np.count_nonzero(changed.reshape(n, -1), axis=1).max()) / (height * width)


def _bounds(rects: list[tuple[int, int, int, int, bool]]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the bounding rectangle of `rects` (at least one)."""
    return (
        min(r[0] for r in rects),
        min(r[1] for r in rects),
        max(r[2] for r in rects),
        max(r[3] for r in rects),
    )


def _span(rects: list[tuple[int, int, int, int, bool]]) -> int:
    """Pixels in the bounding rectangle of `rects` (0 for none)."""
    if not rects:
        return 0
    x0, y0, x1, y1 = _bounds(rects)
    return (x1 - x0) * (y1 - y0)


def _ring_values(
    block: np.ndarray, x0: int, y0: int, x1: int, y1: int, palette: bool
) -> np.ndarray | None:
    """Per frame of `block`, the median (palette: the most common index) of a ring _RING px
    wide around the box; None when the box leaves no ring."""
    height, width = block.shape[1:3]
    ox0, oy0 = max(0, x0 - _RING), max(0, y0 - _RING)
    ox1, oy1 = min(width, x1 + _RING), min(height, y1 + _RING)
    mask = np.ones((oy1 - oy0, ox1 - ox0), bool)
    mask[y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0] = False
    if not mask.any():
        return None
    values = block[:, oy0:oy1, ox0:ox1][:, mask]  # (frames, ring pixels[, 3])
    if palette:
        return np.array([_most_common(v) for v in values], dtype=block.dtype)
    return np.median(values, axis=1).astype(block.dtype)


def _most_common(values: np.ndarray) -> np.generic:
    indices, counts = np.unique(values, return_counts=True)
    return indices[int(np.argmax(counts))]


def _matching_templates(ds: Dataset, templates: Sequence[RegionTemplate]) -> list[RegionTemplate]:
    manufacturer = str(ds.get("Manufacturer", "")).strip().upper()
    model = str(ds.get("ManufacturerModelName", "")).strip().upper()
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return [
        t
        for t in templates
        if (not t.manufacturer or t.manufacturer.strip().upper() == manufacturer)
        and (not t.model or t.model.strip().upper() == model)
        and (t.rows is None or t.rows == rows)
        and (t.columns is None or t.columns == columns)
    ]


# A review shows at most this many regions (a screen of text held for review has fewer).
_REVIEW_REGIONS_MAX = 500


def _frame_regions(
    boxes: Sequence[TextBox], templates: Sequence[TextBox], margin: int, height: int, width: int
) -> list[tuple[int, int, int, int]]:
    """The rectangles (x, y, w, h) _blank fills in one frame (_fill_rects)."""
    return [
        (x0, y0, x1 - x0, y1 - y0)
        for x0, y0, x1, y1, _ in _fill_rects(boxes, templates, margin, height, width)[
            :_REVIEW_REGIONS_MAX
        ]
    ]
