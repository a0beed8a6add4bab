"""Thumbnails of de-identified images for /series/{uid}: the first frame as a viewer shows it.

Only de-identified outputs (what the node forwards) are rendered, never a kept original: an
original's burned-in text is a patient value. Outputs exist until retention releases them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread

from deid_node.deid.pixelcodec import DisplayMapper, decode

THUMBNAIL_SIDE = 160


def render_thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """PNG bytes, or None when the file has no image the node can decode."""
    try:
        ds = dcmread(path)
        if "PixelData" not in ds:
            return None
        decoded = decode(ds)
        image = DisplayMapper(ds, decoded).image(0)
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
