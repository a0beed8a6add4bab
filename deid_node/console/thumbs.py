"""Thumbnails of de-identified images for /series/{uid}: the first frame as a viewer shows it.

Only de-identified outputs (what the node forwards) are rendered, never a kept original: an
original's burned-in text is a patient value. Outputs exist until retention releases them.

Rendering runs in the node's process: an instance whose header declares more decoded bytes than
node.max_decoded_mb is not rendered, only frame 0 is decoded, and the last PNGs are cached by
(path, mtime) so that reloading a page decodes nothing again.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread

from deid_node.deid.pixelcodec import DisplayMapper, decode
from deid_node.deid.pixelsize import declared_decoded_bytes

THUMBNAIL_SIDE = 160
CACHED_THUMBNAILS = 64
# Values larger than this stay on disk when the header is read for the size check.
_DEFER_BYTES = 1024


def render_thumbnail(
    path: Path, side: int = THUMBNAIL_SIDE, max_decoded_bytes: int = 0
) -> bytes | None:
    """PNG bytes, or None when the file has no image the node can decode or its declared
    decoded size is above `max_decoded_bytes` (0: no limit)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _render(str(path), mtime, side, max_decoded_bytes)


@functools.lru_cache(maxsize=CACHED_THUMBNAILS)
def _render(path: str, mtime_ns: int, side: int, max_decoded_bytes: int) -> bytes | None:
    """Cached by (path, mtime): a file rewritten in place is rendered again."""
    try:
        header = dcmread(path, defer_size=_DEFER_BYTES)
        if "PixelData" not in header:
            return None
        declared = declared_decoded_bytes(header)
        if declared is None or (max_decoded_bytes and declared > max_decoded_bytes):
            return None
        # The deferred Pixel Data is read from the file when the decoder asks for it.
        image = DisplayMapper(header, decode(header, index=0)).image(0)
    except Exception:  # any file the decoder cannot show: no thumbnail, never a 500
        return None
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, png = cv2.imencode(".png", image)
    return png.tobytes() if ok else None
