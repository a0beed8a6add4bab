"""The decoded size of an instance's pixel data as its header declares it.

One formula for every place that bounds a decode before doing it (the SCP's 0xA700 refusal,
forwarding's decompression, the console's thumbnails). A leaf module: no pynetdicom, no
pixel decoding, only header attributes.
"""

from __future__ import annotations

import math
from typing import Any


def declared_decoded_bytes(header: Any) -> int | None:
    """Bytes of native pixel data the header announces, as decoded: Rows x Columns x
    SamplesPerPixel x ceil(BitsAllocated/8) x NumberOfFrames, whatever the transfer syntax.
    None when Rows, Columns or BitsAllocated is missing, or any of them is not a positive
    integer (a malformed header). Reads only header attributes, never the pixel data."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        bits = int(header.BitsAllocated)
        frames_value = header.get("NumberOfFrames", 1)
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (AttributeError, TypeError, ValueError):
        return None
    if min(rows, columns, samples, bits, frames) < 1:
        return None
    return rows * columns * samples * frames * math.ceil(bits / 8)
