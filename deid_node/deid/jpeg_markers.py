"""Comment and application markers inside encapsulated JPEG and JPEG 2000 pixel data.

A JPEG codestream may carry free text in COM (FFFE) and APPn (FFE1-FFED, FFEF) segments: a
modality or a PACS can write the patient's name there, and a viewer never shows it. They carry
nothing a decoder needs, except APP0 (JFIF) and APP14 (Adobe: the colour transform), which are
kept. A JPEG 2000 codestream may carry COM (FF64) segments in its main and tile-part headers.

`strip_markers` removes those segments from one frame and leaves every other byte as it was
(the entropy-coded data is not touched); `strip_pixel_data_markers` does it for every frame of
an instance's encapsulated Pixel Data and re-encapsulates only when something was removed.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import UID

_JPEG_TEXT_MARKERS = frozenset({0xFE, *range(0xE1, 0xEE), 0xEF})  # COM, APP1-APP13, APP15
_J2K_COM = 0x64
_J2K_SOT = 0x90
_J2K_SOD = 0x93


def strip_markers(frame: bytes) -> bytes:
    """`frame` without its COM/APPn (JPEG) or COM (JPEG 2000) segments; unchanged if it holds
    none or is neither."""
    if frame[:2] == b"\xff\xd8":
        return _strip_jpeg(frame)
    if frame[:4] == b"\xff\x4f\xff\x51":  # SOC then SIZ: a JPEG 2000 codestream
        return _strip_j2k(frame)
    return frame


def _strip_jpeg(frame: bytes) -> bytes:
    """Marker segments before each scan are walked by their lengths; a scan's entropy-coded
    data runs to the next marker that is not a stuffed byte (FF00) or a restart (FFD0-FFD7)."""
    out = bytearray(frame[:2])
    pos, end, changed = 2, len(frame), False
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            return frame  # not where a marker must be: leave the frame as it is
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            out.append(0xFF)
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        segment_end = pos + 2 + length
        if length < 2 or segment_end > end:
            return frame
        if marker in _JPEG_TEXT_MARKERS:
            changed = True
        else:
            out += frame[pos:segment_end]
        pos = segment_end
        if marker == 0xDA:  # SOS: copy the entropy-coded data up to the next real marker
            scan_end = _scan_end(frame, pos)
            out += frame[pos:scan_end]
            pos = scan_end
    if not changed:
        return frame
    out += frame[pos:]
    return bytes(out)


def _scan_end(frame: bytes, pos: int) -> int:
    while True:
        pos = frame.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(frame):
            return len(frame)
        following = frame[pos + 1]
        # FF00 (JPEG) and FF with a clear high bit (JPEG-LS) are stuffed data; FFD0-FFD7 restarts
        if following < 0x80 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1
            continue
        return pos


def _strip_j2k(frame: bytes) -> bytes:
    """Main and tile-part headers are walked by marker lengths; each tile-part's data is
    skipped by its SOT length (Psot), so the bit stream is never parsed. A COM removed from a
    tile-part header shortens that tile-part: its Psot is lowered to match."""
    out = bytearray(frame[:2])
    pos, end, changed = 2, len(frame), False
    tile_end = None
    psot_at = None  # where the current tile-part's Psot is in `out`
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            return frame
        marker = frame[pos + 1]
        if marker == 0xD9:  # EOC
            break
        if marker == _J2K_SOD:
            if tile_end is None or tile_end > end:
                return frame
            out += frame[pos:tile_end]
            pos, tile_end, psot_at = tile_end, None, None
            continue
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        segment_end = pos + 2 + length
        if length < 2 or segment_end > end:
            return frame
        if marker == _J2K_SOT:
            psot = int.from_bytes(frame[pos + 6 : pos + 10], "big")
            tile_end = pos + psot if psot else end
            psot_at = len(out) + 6 if psot else None
        if marker == _J2K_COM:
            changed = True
            if psot_at is not None:
                psot = int.from_bytes(out[psot_at : psot_at + 4], "big") - (length + 2)
                out[psot_at : psot_at + 4] = psot.to_bytes(4, "big")
        else:
            out += frame[pos:segment_end]
        pos = segment_end
    if not changed:
        return frame
    out += frame[pos:]
    return bytes(out)


def strip_pixel_data_markers(ds: Dataset) -> int:
    """Remove COM/APPn segments from every frame of `ds`'s encapsulated Pixel Data; returns
    how many frames changed (0: Pixel Data left exactly as it was)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or syntax is None or not UID(syntax).is_encapsulated:
        return 0
    data = ds.PixelData
    frames_count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = list(generate_frames(data, number_of_frames=frames_count))
    stripped = [strip_markers(frame) for frame in frames]
    changed = sum(a is not b for a, b in zip(frames, stripped, strict=True))
    if not changed:
        return 0
    if "ExtendedOffsetTable" in ds:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            stripped
        )
    else:
        # the Basic Offset Table item comes first: a length above zero means it has offsets
        has_table = len(data) >= 8 and int.from_bytes(data[4:8], "little") > 0
        ds.PixelData = encapsulate(stripped, has_bot=has_table)
    return changed
