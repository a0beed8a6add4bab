"""COM/APPn segments inside encapsulated JPEG, JPEG-LS and JPEG 2000 frames are removed, and
nothing else changes: the frames are byte-exact otherwise and decode to the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from deid_node.deid.jpeg_markers import strip_markers, strip_pixel_data_markers

TEXT = b"Quillfeather^Ilsabet MRN20240917"


def _segment(marker: bytes, payload: bytes) -> bytes:
    return marker + (len(payload) + 2).to_bytes(2, "big") + payload


def _plant(frame: bytes) -> bytes:
    """Text segments where writers put them: after SOI (JPEG) or SIZ (JPEG 2000)."""
    if frame[:2] == b"\xff\xd8":
        planted = _segment(b"\xff\xfe", TEXT) + _segment(b"\xff\xe1", b"Exif\x00\x00" + TEXT)
        planted += _segment(b"\xff\xed", b"Photoshop 3.0\x00" + TEXT)  # APP13
        return frame[:2] + planted + frame[2:]
    assert frame[:4] == b"\xff\x4f\xff\x51"
    siz_end = 4 + int.from_bytes(frame[4:6], "big")
    return frame[:siz_end] + _segment(b"\xff\x64", b"\x00\x01" + TEXT) + frame[siz_end:]


FILES = [
    "SC_rgb_jpeg_dcmtk.dcm",  # baseline, with APP0 JFIF
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # lossless process 14
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "JPEG2000.dcm",
    "emri_small_jpeg_2k_lossless.dcm",  # 10 frames
]


@pytest.mark.parametrize("name", FILES)
def test_planted_text_segments_are_removed_and_pixels_stay_equal(name: str) -> None:
    ds = dcmread(get_testdata_file(name))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    originals = list(generate_frames(ds.PixelData, number_of_frames=count))
    expected = ds.pixel_array.copy()
    # encoders' own comments (MITRA, Kakadu, GDCM/OpenJPEG) go too
    clean = [strip_markers(f) for f in originals]
    assert all(strip_markers(f) is f for f in clean)  # nothing left to strip: untouched

    ds.PixelData = encapsulate([_plant(f) for f in originals], has_bot=count > 1)
    planted = ds.pixel_array.copy()  # decoders skip the segments
    assert np.array_equal(planted, expected)

    assert strip_pixel_data_markers(ds) == count
    stripped = list(generate_frames(ds.PixelData, number_of_frames=count))
    assert stripped == clean  # byte-exact: only the text segments went
    assert TEXT not in ds.PixelData
    assert np.array_equal(ds.pixel_array, expected)


def test_a_comment_in_a_jpeg_2000_tile_part_header_goes_and_its_length_follows() -> None:
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    expected = ds.pixel_array.copy()
    frame = strip_markers(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sot = frame.index(b"\xff\x90")
    psot = int.from_bytes(frame[sot + 6 : sot + 10], "big")
    com = _segment(b"\xff\x64", b"\x00\x01" + TEXT)
    planted = bytearray(frame[: sot + 12] + com + frame[sot + 12 :])  # after the SOT segment
    planted[sot + 6 : sot + 10] = (psot + len(com)).to_bytes(4, "big")
    assert strip_markers(bytes(planted)) == frame
    ds.PixelData = encapsulate([bytes(planted)])
    assert np.array_equal(ds.pixel_array, expected)  # the planted file decodes too


def test_adobe_and_jfif_segments_are_kept_and_unparseable_frames_left_alone() -> None:
    app0 = _segment(b"\xff\xe0", b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    app14 = _segment(b"\xff\xee", b"Adobe\x00\x64\x00\x00\x00\x00\x01")
    com = _segment(b"\xff\xfe", TEXT)
    frame = b"\xff\xd8" + app0 + app14 + com + b"\xff\xd9"
    assert strip_markers(frame) == b"\xff\xd8" + app0 + app14 + b"\xff\xd9"
    truncated = b"\xff\xd8" + com[:-4]  # a length past the end: left exactly as it was
    assert strip_markers(truncated) is truncated
    assert strip_markers(b"not a codestream") == b"not a codestream"


def test_native_pixel_data_is_not_touched() -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    before = ds.PixelData
    assert strip_pixel_data_markers(ds) == 0
    assert ds.PixelData is before
