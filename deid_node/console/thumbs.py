"""Images for the console: thumbnails of de-identified images (/series/{uid}) and, for a file
held for pixel review, its first frame as it would leave with the redaction's regions drawn
(/quarantine).

A thumbnail is rendered from a de-identified output (what the node forwards), never from a
kept original: an original's burned-in text is a patient value. A review image is rendered
from the kept original, but only with the regions the redaction blanks (recorded by the
pipeline, deid/pixels.py PixelReviewError) filled black first and then outlined: it shows what
the node would forward if the operator released it, and no text the node found. Text the OCR
did not find stays visible, as it would leave: that is what the reviewer is there to see.

Rendering runs in the node's process: an instance whose header declares more decoded bytes than
node.max_decoded_mb is not rendered, only frame 0 is decoded, and the last PNGs are cached by
(path, mtime) so that reloading a page decodes nothing again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread

from deid_node.deid.pixelcodec import DisplayMapper, decode
from deid_node.deid.pixelsize import declared_decoded_bytes

THUMBNAIL_SIDE = 160
REVIEW_SIDE = 640
CACHED_THUMBNAILS = 64
# Values larger than this stay on disk when the header is read for the size check.
_DEFER_BYTES = 1024
# The outline of a blanked region (BGR): orange, seen on black, grey and colour images.
_OUTLINE = (0, 140, 255)

Region = tuple[int, int, int, int]  # x, y, w, h in frame pixels


def render_thumbnail(
    path: Path, side: int = THUMBNAIL_SIDE, max_decoded_bytes: int = 0
) -> bytes | None:
    """PNG bytes, or None when the file has no image the node can decode or its declared
    decoded size is above `max_decoded_bytes` (0: no limit)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _render(str(path), mtime, side, max_decoded_bytes, None)


def render_review(
    path: Path,
    regions: Sequence[Sequence[int]],
    side: int = REVIEW_SIDE,
    max_decoded_bytes: int = 0,
) -> bytes | None:
    """PNG bytes of frame 0 with `regions` (x, y, w, h) filled black, then outlined; None as
    for render_thumbnail."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    boxes = tuple((int(x), int(y), int(w), int(h)) for x, y, w, h in regions)
    return _render(str(path), mtime, side, max_decoded_bytes, boxes)


@functools.lru_cache(maxsize=CACHED_THUMBNAILS)
def _render(
    path: str,
    mtime_ns: int,
    side: int,
    max_decoded_bytes: int,
    regions: tuple[Region, ...] | None,
) -> bytes | None:
    """Cached by (path, mtime): a file rewritten in place is rendered again. regions: None for
    a thumbnail; a review image otherwise (its regions blanked and outlined)."""
    image = _first_frame(path, max_decoded_bytes)
    if image is None:
        return None
    if regions is not None:
        image = _blank(image, regions)
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    if regions is not None:
        image = _outline(image, regions, scale)
    ok, png = cv2.imencode(".png", image)
    return png.tobytes() if ok else None


def _first_frame(path: str, max_decoded_bytes: int) -> np.ndarray | None:
    """Frame 0 as a viewer shows it (8-bit grey or RGB), or None."""
    try:
        header = dcmread(path, defer_size=_DEFER_BYTES)
        if "PixelData" not in header:
            return None
        declared = declared_decoded_bytes(header)
        if declared is None or (max_decoded_bytes and declared > max_decoded_bytes):
            return None
        # The deferred Pixel Data is read from the file when the decoder asks for it.
        return np.array(DisplayMapper(header, decode(header, index=0)).image(0))
    except Exception:  # any file the decoder cannot show: no image, never a 500
        return None


def _blank(image: np.ndarray, regions: tuple[Region, ...]) -> np.ndarray:
    """Fill every region black, at full resolution, before anything is scaled: no pixel of
    what the redaction would blank reaches the PNG."""
    out = image.copy()
    height, width = out.shape[:2]
    for x, y, w, h in regions:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(width, x + w), min(height, y + h)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = 0
    return out


def _outline(image: np.ndarray, regions: tuple[Region, ...], scale: float) -> np.ndarray:
    """Draw each region's outline (in colour) on the scaled image."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    for x, y, w, h in regions:
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = round((x + w) * scale) - 1, round((y + h) * scale) - 1
        cv2.rectangle(out, (x0, y0), (max(x0, x1), max(y0, y1)), _OUTLINE, 1)
    return out
