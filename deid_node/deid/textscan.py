"""Finding burned-in text in a decoded image's frames: which boxes to blank in each frame.

A box is text only when the recognizer reads characters in it with confidence (TEXT_RULES), or
it continues a line that was read. A single frame is read whole. A cine (at least
_CINE_MIN_FRAMES frames) is read once when its text stands still (_scan_cine); when text moves
or changes, only the moving regions are read in every frame; when frames differ as wholes
(slices, not a loop), every frame is read, a frame that differs from the previous one only in a
region being read only there. Engines that batch frames (EasyOCR on CUDA) get them together.

deid/pixels.py blanks what this module finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil

import numpy as np

from deid_node.config import PixelsConfig
from deid_node.deid.pixelcodec import Decoded, DisplayMapper
from deid_node.deid.sensitive import SensitiveTextClassifier
from deid_node.ocr import OcrEngine, TextBox, recognize_frames
from deid_node.ocr.base import merge_overlapping, recognize_in_frame

# Frames are diffed against the previous one; changed regions smaller than this share of the
# frame are re-scanned alone, larger ones as a whole frame.
_CROP_MAX_SHARE = 0.5
_CROP_PAD = 24
_CROP_MIN_SIDE = 160
# Detector boxes can stop short of a line's first or last glyph (low contrast, cut by the
# edge); a line's ends are padded by this share of its height, its top and bottom by the margin.
LINE_END_PAD = 0.75
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
# Frames read together by an engine that batches (and held in memory at once for it).
_BATCH_FRAMES = 16


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


def scan_frames(
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
    covered = blank_mask(boxes, height, width, config.margin_px)
    outside = moving & ~covered
    if not outside.any():
        return _CineScan(boxes, read)
    if outside.mean() > _CINE_MAX_MOVING_SHARE:
        return _CineScan(None, read, "cine_frames_differ")
    regions = _moving_regions(outside, boxes, height, width)
    farthest = np.where(high.astype(np.int16) - first > first.astype(np.int16) - low, high, low)
    views = [display.image(count // 2), display.image(count - 1), farthest]
    extra: list[TextBox] = []
    for x0, y0, x1, y1 in regions:
        crops = [view[y0:y1, x0:x1] for view in views]
        finds = _find_many(crops, engine, classifier, config.max_detect_side, (height, width))
        for found, seen in finds:
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
    previous = display.image(0).copy()
    stills: list[list[TextBox]] = []
    finds: dict[int, list[TextBox]] = {}  # per changed frame (its regions differ)
    pending: list[tuple[int, list[np.ndarray]]] = []  # changed frames' crops, read together
    read = 0

    def read_pending() -> int:
        seen_total = 0
        for at, (x0, y0, _, _) in enumerate(once.regions):
            crops = [crops_of[at] for _, crops_of in pending]
            reads = _find_many(crops, engine, classifier, config.max_detect_side, (height, width))
            for (index, _), (boxes, seen) in zip(pending, reads, strict=True):
                seen_total += seen
                finds.setdefault(index, []).extend(b.shifted(x0, y0) for b in boxes)
        pending.clear()
        return seen_total

    for index in range(1, count):
        image = display.image(index)
        if not all(
            np.array_equal(image[y0:y1, x0:x1], previous[y0:y1, x0:x1])
            for x0, y0, x1, y1 in once.regions
        ):
            finds[index] = []
            pending.append((index, [image[y0:y1, x0:x1].copy() for x0, y0, x1, y1 in once.regions]))
            if len(pending) == _BATCH_FRAMES:
                read += read_pending()
        stills.append(
            [
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
        )
        previous = image.copy()
    read += read_pending()
    found: list[TextBox] = []
    for index, still in zip(range(1, count), stills, strict=True):
        found = finds.get(index, found)  # a frame whose regions did not change: the last finds
        result.append(outside + still + found)
    return result, read, count - 1 - len(finds)


def _value_range(display: DisplayMapper, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel lowest and highest displayed value over all frames."""
    low = display.image(0).copy()
    high = low.copy()
    for index in range(1, count):
        image = display.image(index)
        np.minimum(low, image, out=low)
        np.maximum(high, image, out=high)
    return low, high


def blank_mask(boxes: Sequence[TextBox], height: int, width: int, margin: int) -> np.ndarray:
    """The pixels _blank fills for `boxes` (line ends padded as there)."""
    mask = np.zeros((height, width), bool)
    for box in boxes:
        mx = max(margin, ceil(LINE_END_PAD * box.h))
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
    if _batches(engine):
        return _scan_every_frame_batched(decoded, display, engine, classifier, config)
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


def _scan_every_frame_batched(
    decoded: Decoded,
    display: DisplayMapper,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> tuple[list[list[TextBox]], int, int]:
    """_scan_every_frame for an engine that reads frames together (EasyOCR on CUDA): a frame
    equal to the previous one reuses its boxes; every other frame is read whole, _BATCH_FRAMES
    at a time (on a GPU a whole frame costs little more than a crop)."""
    frames = decoded.frames
    changed = [
        index
        for index in range(frames.shape[0])
        if index == 0 or not np.array_equal(frames[index - 1], frames[index])
    ]
    finds: dict[int, list[TextBox]] = {}
    read = 0
    for chunk in _chunks(changed):
        images = [display.image(index).copy() for index in chunk]
        for index, (boxes, seen) in zip(
            chunk,
            _find_many(images, engine, classifier, config.max_detect_side),
            strict=True,
        ):
            finds[index] = boxes
            read += seen
    result: list[list[TextBox]] = []
    for index in range(frames.shape[0]):
        result.append(finds[index] if index in finds else result[-1])
    return result, len(changed), read


def _batches(engine: OcrEngine) -> bool:
    """The engine reads several same-sized images in one call faster than one by one."""
    return bool(getattr(engine, "batches", False))


def _chunks(indices: list[int]) -> list[list[int]]:
    """`indices` in runs of _BATCH_FRAMES: frames held in memory at once."""
    return [indices[i : i + _BATCH_FRAMES] for i in range(0, len(indices), _BATCH_FRAMES)]


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
    return _find_many([image], engine, classifier, max_side, frame_shape)[0]


def _find_many(
    images: Sequence[np.ndarray],
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    max_side: int,
    frame_shape: tuple[int, int] | None = None,
) -> list[tuple[list[TextBox], int]]:
    """_find of each of `images` (all the same size), read in one call where the engine
    batches (recognize_frames), else one by one."""
    if not images:
        return []
    height, width = images[0].shape[:2]
    frame_h, frame_w = frame_shape or (height, width)
    scale = 1.0
    if max(frame_h, frame_w) > max_side:
        scale = max_side / max(frame_h, frame_w)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        import cv2  # here, not at the top: REDACT_NO_TEXT never loads OpenCV (issue 17)

        images = [cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in images]
    shape = (max(1, round(frame_h * scale)), max(1, round(frame_w * scale)))
    if _batches(engine) and len(images) > 1:
        reads = recognize_frames(engine, images)
    else:
        reads = [recognize_in_frame(engine, image, shape) for image in images]
    rule = TEXT_RULES.get(engine.name, _DEFAULT_RULE)
    return [_to_blank(read, rule, classifier, scale) for read in reads]


def _to_blank(
    read: Sequence[TextBox],
    rule: TextRule,
    classifier: SensitiveTextClassifier | None,
    scale: float,
) -> tuple[list[TextBox], int]:
    """What one recognition asks to blank, in the unscaled image's coordinates, and how many
    of its boxes read as text."""
    text, parts = text_boxes(read, rule)
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
