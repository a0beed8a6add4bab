"""Burned-in text in pixel data: find text, blank it, and only text; say how much changed.

REDACT_NO_TEXT never decodes; it only clears unused high bits of native pixel data, where old
devices drew overlays. Otherwise every frame is decoded (pixelcodec), mapped to the 8-bit image
a viewer would show, and read by the OCR engine. A box is text only when the recognizer reads
characters in it with confidence (or it continues a line that was read, or a template names
it): detectors take vessels, vertebrae, sulci and CT edges for strokes, and the recognizer reads
them as one or two glyphs with a low score. Text boxes are filled with display-black;
REDACT_SENSITIVE_TEXT fills only those the classifier calls identifying (and line parts it
could not read). Pixels are written back when something was blanked or unused bits were set.

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
from deid_node.errors import PixelError
from deid_node.modes import DeidentifyRedactTextMode
from deid_node.ocr import OcrEngine, TextBox, get_engine
from deid_node.ocr.base import merge_overlapping, recognize_in_frame

# Frames are diffed against the previous one; changed regions smaller than this share of the
# frame are re-scanned alone, larger ones as a whole frame.
_CROP_MAX_SHARE = 0.5
_CROP_PAD = 24
_CROP_MIN_SIDE = 160
# Detector boxes can stop short of a line's first or last glyph (low contrast, cut by the
# edge); a line's ends are padded by this share of its height, its top and bottom by the margin.
_LINE_END_PAD = 0.75
# A pixel counts as changed when its displayed value moved by more than this (of 255): blanking
# near-black background (JPEG noise around US text) changes nothing anyone can see.
_VISIBLE_CHANGE = 24
_RING = 3
# Cines (at least this many frames) are read once when their text stands still. A pixel
# moves when its displayed value spans more than _STILL_TOLERANCE over the frames (lossy
# compression jitters still pixels by a few levels). Frames whose moving pixels (outside the
# text found) cover more than _CINE_MAX_MOVING_SHARE differ as wholes (slices, not a loop):
# each is read. A box found by the check counts as text already found when this share of it
# lies inside what the first frame's boxes blank.
_CINE_MIN_FRAMES = 4
_STILL_TOLERANCE = 12
_CINE_MAX_MOVING_SHARE = 0.6
_CINE_SAME_TEXT = 0.5


@dataclass(frozen=True)
class TextRule:
    """When a recognized box counts as text: at least `min_chars` ASCII letters or digits read
    with a score of at least `min_score`, or 1-2 of them with at least `short_score`."""

    min_chars: int
    min_score: float
    short_score: float


# Tuned on real CT/MR/NM/CR images without text (pydicom's and pydicom-data's test files),
# real US text, and generated burned-in text (docs/benchmarks-pixels.md). On anatomy RapidOCR
# reads 0-3 glyphs, one glyph scoring up to 0.67 and three up to 0.24; on text it scores
# 0.5-1.0 (0.5-0.73 for 6-8 px lines of real US). EasyOCR finds few boxes on anatomy (one
# glyph at 0.11; a CR laterality marker at 0.4) and scores faint text as low as 0.2.
TEXT_RULES = {
    "rapidocr": TextRule(min_chars=3, min_score=0.5, short_score=0.8),
    "easyocr": TextRule(min_chars=3, min_score=0.1, short_score=0.35),
}
_DEFAULT_RULE = TextRule(min_chars=3, min_score=0.5, short_score=0.8)


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
    frame_boxes, read, how = _scan_frames(decoded, display, engine, classifier, config)
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
    pixels; a template region, or a box with nothing around it, with display-black.
    """
    total = 0
    worst = 0.0
    frames = decoded.frames
    palette = decoded.photometric == "PALETTE COLOR"
    height, width = frames.shape[1:3]
    for index in range(frames.shape[0]):
        # Template regions last: display-black wins over a ring fill that overlaps them.
        regions = [(b, max(margin, ceil(_LINE_END_PAD * b.h)), margin) for b in frame_boxes[index]]
        regions += [(b, 0, 0) for b in template_boxes]
        templated = [False] * len(frame_boxes[index]) + [True] * len(template_boxes)
        rects = []
        for (box, mx, my), template in zip(regions, templated, strict=True):
            x0, y0 = max(0, box.x - mx), max(0, box.y - my)
            x1, y1 = min(width, box.x + box.w + mx), min(height, box.y + box.h + my)
            if x1 > x0 and y1 > y0:
                rects.append((x0, y0, x1, y1, template))
        total += len(regions)
        if not rects:
            continue
        # Only the boxes are read and compared, not the whole frame (60-frame cines).
        image = display.image(index)
        before = [image[y0:y1, x0:x1].astype(np.int16) for x0, y0, x1, y1, _ in rects]
        frame = frames[index]
        # Every ring is read from the original before any box is filled.
        rings = [
            None if template else _ring_value(frame, x0, y0, x1, y1, palette)
            for x0, y0, x1, y1, template in rects
        ]
        for (x0, y0, x1, y1, _), ring in zip(rects, rings, strict=True):
            frame[y0:y1, x0:x1] = fill if ring is None else ring
        image = display.image(index)
        changed = np.zeros((height, width), bool)
        for (x0, y0, x1, y1, _), old in zip(rects, before, strict=True):
            diff = np.abs(image[y0:y1, x0:x1].astype(np.int16) - old) > _VISIBLE_CHANGE
            changed[y0:y1, x0:x1] |= diff.any(axis=2) if diff.ndim == 3 else diff
        worst = max(worst, int(np.count_nonzero(changed)) / (height * width))
    return total, worst


def _ring_value(
    frame: np.ndarray, x0: int, y0: int, x1: int, y1: int, palette: bool
) -> np.ndarray | None:
    """The median (palette: the most common index) of a ring _RING px wide around the box;
    None when the box leaves no ring."""
    height, width = frame.shape[:2]
    ox0, oy0 = max(0, x0 - _RING), max(0, y0 - _RING)
    ox1, oy1 = min(width, x1 + _RING), min(height, y1 + _RING)
    outer = frame[oy0:oy1, ox0:ox1]
    mask = np.ones(outer.shape[:2], bool)
    mask[y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0] = False
    if not mask.any():
        return None
    values = outer[mask]
    if palette:
        indices, counts = np.unique(values, return_counts=True)
        return indices[int(np.argmax(counts))]
    return np.median(values, axis=0).astype(frame.dtype)


def _scan_frames(
    decoded: Decoded,
    display: DisplayMapper,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> tuple[list[list[TextBox]], int, list[str]]:
    """Boxes to blank per frame (text replaced by the sensitive category), frames OCR'd in
    full, text boxes read (identifying or not), and how the frames were scanned (reasons).

    A cine is read once (_scan_cine); when its check finds text the first frame did not hold,
    the moving regions are read in every frame (_scan_moving_every_frame); when its frames
    differ as wholes, every frame is scanned (_scan_every_frame).
    """
    count = decoded.frames.shape[0]
    if count >= _CINE_MIN_FRAMES:
        once = _scan_cine(decoded, display, engine, classifier, config)
        if once.boxes is not None:
            return [once.boxes] * count, once.read, ["cine_text_found_once"]
        if once.regions:
            frame_boxes, read, reused = _scan_moving_every_frame(
                display, count, once, engine, classifier, config
            )
            return frame_boxes, once.read + read, [once.why, f"frames_reused={reused}"]
        frame_boxes, scanned, read = _scan_every_frame(decoded, display, engine, classifier, config)
        return frame_boxes, read, [once.why, f"frames_reused={count - scanned}"]
    frame_boxes, scanned, read = _scan_every_frame(decoded, display, engine, classifier, config)
    return frame_boxes, read, [f"frames_reused={count - scanned}"] if scanned < count else []


@dataclass
class _CineScan:
    boxes: list[TextBox] | None  # to blank in every frame; None: scan every frame
    read: int
    why: str = ""
    first: list[TextBox] = field(default_factory=list)  # the first frame's boxes
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)  # moving, outside


def _scan_cine(
    decoded: Decoded,
    display: DisplayMapper,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> _CineScan:
    """Text of a cine found once: the first frame read in full; then only where pixels move
    (outside the boxes found), the middle and last frames and a projection that keeps, per
    moving pixel, the value farthest from the first frame's (text shown in any frame, on a
    still background, stands out in it) are read. Text there that the first frame's boxes do
    not cover means the text moves or comes and goes: boxes None, scan every frame."""
    count = decoded.frames.shape[0]
    height, width = decoded.frames.shape[1:3]
    first = display.image(0).copy()
    low, high = _value_range(display, count)
    moving = (high.astype(np.int16) - low) > _STILL_TOLERANCE
    if moving.ndim == 3:
        moving = moving.any(axis=2)
    boxes, read = _find(first, engine, classifier, config.max_detect_side)
    covered = _blank_mask(boxes, height, width, config.margin_px)
    outside = moving & ~covered
    if not outside.any():
        return _CineScan(boxes, read)
    if outside.mean() > _CINE_MAX_MOVING_SHARE:
        return _CineScan(None, read, "cine_frames_differ")
    regions = _moving_regions(outside, boxes, height, width)
    farthest = np.where(high.astype(np.int16) - first > first.astype(np.int16) - low, high, low)
    views = [display.image(count // 2), display.image(count - 1), farthest]
    extra: list[TextBox] = []
    for view in views:
        for x0, y0, x1, y1 in regions:
            crop = view[y0:y1, x0:x1]
            found, seen = _find(crop, engine, classifier, config.max_detect_side, (height, width))
            read += seen
            for box in (b.shifted(x0, y0) for b in found):
                inside = covered[box.y : box.y + box.h, box.x : box.x + box.w]
                if inside.size and inside.mean() >= _CINE_SAME_TEXT:
                    extra.append(box)  # the first frame's text, its box drawn a little wider
                else:
                    return _CineScan(None, read, "cine_text_changes", boxes, regions)
    return _CineScan(boxes + extra, read)


def _scan_moving_every_frame(
    display: DisplayMapper,
    count: int,
    once: _CineScan,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> tuple[list[list[TextBox]], int, int]:
    """Boxes per frame when a cine's text moves or changes: the first frame's boxes outside
    the moving regions (they cover every still pixel's text and what changes inside them) plus
    what each frame's moving regions hold, read there only; a frame whose regions equal the
    previous frame's reuses its finds. (boxes per frame, text boxes read, frames reused)."""
    height, width = display.image(0).shape[:2]
    result = [once.first]
    # A first-frame box inside a region (regions are grown over the boxes they cut) is kept in
    # a frame where its pixels are those of the first frame (still text, read whole there);
    # where they changed, the region's reading decides: moved text is not blanked where it no
    # longer is.
    areas = [TextBox(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in once.regions]
    inside = [b for b in once.first if any(b.intersects(area) for area in areas)]
    outside = [b for b in once.first if b not in inside]
    first = display.image(0).astype(np.int16)
    found: list[TextBox] = []
    previous = display.image(0).copy()
    read = reused = 0
    for index in range(1, count):
        image = display.image(index)
        if all(
            np.array_equal(image[y0:y1, x0:x1], previous[y0:y1, x0:x1])
            for x0, y0, x1, y1 in once.regions
        ):
            reused += 1
        else:
            found = []
            for x0, y0, x1, y1 in once.regions:
                crop = image[y0:y1, x0:x1]
                boxes, seen = _find(
                    crop, engine, classifier, config.max_detect_side, (height, width)
                )
                read += seen
                found += [b.shifted(x0, y0) for b in boxes]
        still = [
            b
            for b in inside
            if (
                np.abs(
                    image[b.y : b.y + b.h, b.x : b.x + b.w]
                    - first[b.y : b.y + b.h, b.x : b.x + b.w]
                )
                <= _STILL_TOLERANCE
            ).all()
        ]
        result.append(outside + still + found)
        previous = image.copy()
    return result, read, reused


def _value_range(display: DisplayMapper, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel lowest and highest displayed value over all frames."""
    low = display.image(0).copy()
    high = low.copy()
    for index in range(1, count):
        image = display.image(index)
        np.minimum(low, image, out=low)
        np.maximum(high, image, out=high)
    return low, high


def _blank_mask(boxes: Sequence[TextBox], height: int, width: int, margin: int) -> np.ndarray:
    """The pixels _blank fills for `boxes` (line ends padded as there)."""
    mask = np.zeros((height, width), bool)
    for box in boxes:
        mx = max(margin, ceil(_LINE_END_PAD * box.h))
        mask[
            max(0, box.y - margin) : box.y + box.h + margin,
            max(0, box.x - mx) : box.x + box.w + mx,
        ] = True
    return mask


def _moving_regions(
    outside: np.ndarray, boxes: list[TextBox], height: int, width: int
) -> list[tuple[int, int, int, int]]:
    """Rectangles, padded for context, over the moving pixels outside the boxes found; near or
    overlapping ones merged so a text line is read whole."""
    import cv2  # here, not at the top: REDACT_NO_TEXT never loads OpenCV (issue 17)

    grown = cv2.dilate(outside.astype(np.uint8), np.ones((9, 9), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
    return merge_overlapping(
        [
            _expand_over_boxes((int(x), int(y), int(x + w), int(y + h)), boxes, height, width)
            for x, y, w, h, _ in stats[1:count]
        ]
    )


def _scan_every_frame(
    decoded: Decoded,
    display: DisplayMapper,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> tuple[list[list[TextBox]], int, int]:
    """Boxes to blank per frame, frames OCR'd, and text boxes read.

    A frame equal to the previous one reuses its boxes; a frame that differs only in a region
    (US cine: the sector moves, the overlay stays) is re-scanned only in that region.
    """
    frames = decoded.frames
    height, width = frames.shape[1:3]
    result: list[list[TextBox]] = []
    previous: np.ndarray | None = None
    scanned = read = 0
    for index in range(frames.shape[0]):
        frame = frames[index]
        region = None if previous is None else _changed_region(previous, frame)
        if previous is not None and region is None:
            result.append(result[-1])
            previous = frame
            continue
        scanned += 1
        if region is None:
            boxes, seen = _find(display.image(index), engine, classifier, config.max_detect_side)
        else:
            x0, y0, x1, y1 = _expand_over_boxes(region, result[-1], height, width)
            if (x1 - x0) * (y1 - y0) > _CROP_MAX_SHARE * height * width:
                boxes, seen = _find(
                    display.image(index), engine, classifier, config.max_detect_side
                )
            else:
                crop = display.image(index)[y0:y1, x0:x1]
                found, seen = _find(
                    crop, engine, classifier, config.max_detect_side, (height, width)
                )
                inside = TextBox(x0, y0, x1 - x0, y1 - y0)
                kept = [b for b in result[-1] if not b.intersects(inside)]
                boxes = kept + [b.shifted(x0, y0) for b in found]
        read += seen
        result.append(boxes)
        previous = frame
    return result, scanned, read


def _find(
    image: np.ndarray,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    max_side: int,
    frame_shape: tuple[int, int] | None = None,
) -> tuple[list[TextBox], int]:
    """Boxes to blank in `image` coordinates (with a classifier only the identifying ones,
    text = category) and the number of text boxes read. frame_shape: `image` is a crop of a
    frame that large, scaled as the whole frame would be."""
    height, width = image.shape[:2]
    frame_h, frame_w = frame_shape or (height, width)
    scale = 1.0
    if max(frame_h, frame_w) > max_side:
        scale = max_side / max(frame_h, frame_w)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        import cv2  # here, not at the top: REDACT_NO_TEXT never loads OpenCV (issue 17)

        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    shape = (max(1, round(frame_h * scale)), max(1, round(frame_w * scale)))
    read = recognize_in_frame(engine, image, shape)
    text, parts = text_boxes(read, TEXT_RULES.get(engine.name, _DEFAULT_RULE))
    if classifier is None:
        boxes = text + parts
    else:
        boxes = []
        for box in text:
            category = classifier.reason(box.text)
            if category is not None:
                boxes.append(TextBox(box.x, box.y, box.w, box.h, category, box.score))
        # A part of a line the recognizer could not read may hold a name: blank it.
        boxes += [TextBox(b.x, b.y, b.w, b.h, "unread_line_part", b.score) for b in parts]
    if scale != 1.0:
        boxes = [b.scaled(1 / scale) for b in boxes]
    return boxes, len(text)


def text_boxes(read: Sequence[TextBox], rule: TextRule) -> tuple[list[TextBox], list[TextBox]]:
    """(boxes read as text, unread boxes that continue a text line) of one recognition."""
    text = [b for b in read if _reads_as_text(b, rule)]
    unsure = [b for b in read if not _reads_as_text(b, rule)]
    parts: list[TextBox] = []
    grown = True
    while grown and unsure:
        grown = False
        for box in list(unsure):
            if any(_same_line(box, t) for t in (*text, *parts)):
                parts.append(box)
                unsure.remove(box)
                grown = True
    return text, parts


def _reads_as_text(box: TextBox, rule: TextRule) -> bool:
    chars = sum(c.isascii() and c.isalnum() for c in box.text or "")
    if chars >= rule.min_chars:
        return box.score >= rule.min_score
    return chars >= 1 and box.score >= rule.short_score


def _same_line(box: TextBox, line: TextBox) -> bool:
    """`box` sits on `line`'s text line, next to it: similar height, mostly the same rows, a gap
    of at most two line heights."""
    low, high = sorted((box.h, line.h))
    if high > 2 * low:
        return False
    overlap = min(box.y + box.h, line.y + line.h) - max(box.y, line.y)
    if overlap < 0.6 * low:
        return False
    gap = max(box.x - (line.x + line.w), line.x - (box.x + box.w))
    return gap <= 2 * line.h


def _changed_region(previous: np.ndarray, frame: np.ndarray) -> tuple[int, int, int, int] | None:
    diff = previous != frame
    if diff.ndim == 3:
        diff = diff.any(axis=2)
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(diff.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _expand_over_boxes(
    region: tuple[int, int, int, int], boxes: list[TextBox], height: int, width: int
) -> tuple[int, int, int, int]:
    """Pad the changed region for context and grow it over any box it cuts, so a text line is
    always detected whole or kept whole."""
    x0, y0, x1, y1 = region
    x0, y0 = max(0, x0 - _CROP_PAD), max(0, y0 - _CROP_PAD)
    x1, y1 = min(width, x1 + _CROP_PAD), min(height, y1 + _CROP_PAD)
    if x1 - x0 < _CROP_MIN_SIDE:
        grow = (_CROP_MIN_SIDE - (x1 - x0) + 1) // 2
        x0, x1 = max(0, x0 - grow), min(width, x1 + grow)
    if y1 - y0 < _CROP_MIN_SIDE:
        grow = (_CROP_MIN_SIDE - (y1 - y0) + 1) // 2
        y0, y1 = max(0, y0 - grow), min(height, y1 + grow)
    grown = True
    while grown:
        grown = False
        inside = TextBox(x0, y0, x1 - x0, y1 - y0)
        for b in boxes:
            if b.intersects(inside) and (b.x < x0 or b.y < y0 or b.x + b.w > x1 or b.y + b.h > y1):
                x0, y0 = min(x0, b.x), min(y0, b.y)
                x1, y1 = max(x1, b.x + b.w), max(y1, b.y + b.h)
                grown = True
    return x0, y0, x1, y1


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
    """The rectangles (x, y, w, h) _blank fills in one frame: text boxes padded as there,
    template regions as they are, clipped to the frame."""
    out = []
    for box, mx, my in [
        *((b, max(margin, ceil(_LINE_END_PAD * b.h)), margin) for b in boxes),
        *((b, 0, 0) for b in templates),
    ][:_REVIEW_REGIONS_MAX]:
        x0, y0 = max(0, box.x - mx), max(0, box.y - my)
        x1, y1 = min(width, box.x + box.w + mx), min(height, box.y + box.h + my)
        if x1 > x0 and y1 > y0:
            out.append((int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
    return out
