"""Console thumbnails: bounded by node.max_decoded_mb (declared size from the header), only
frame 0 decoded, cached by (path, mtime)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from deid_node.console import thumbs


def image_file(
    path: Path, frames: int, rows: int = 64, columns: int = 64, value: int = 200
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames = frames
    pixels = np.zeros((frames, rows, columns), np.uint8)
    pixels[0, : rows // 2] = value
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_only_frame_0_is_decoded(tmp_path):
    """Planted fault: frame 1 of an RLE file is garbage; decoding every frame fails, the
    thumbnail (frame 0 only) is still rendered."""
    from pydicom import dcmread

    path = image_file(tmp_path / "two.dcm", frames=2)
    ds = dcmread(path)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    first = next(generate_frames(ds.PixelData, number_of_frames=2))
    ds.PixelData = encapsulate([first, b"\x00\x00\x00\x00" + b"\xff" * 60])
    ds.save_as(path, enforce_file_format=True)
    png = thumbs.render_thumbnail(path)
    assert png is not None
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape == (64, 64) and image[0, 0] > image[-1, 0]


def test_above_max_decoded_bytes_no_thumbnail_is_rendered(tmp_path):
    path = image_file(tmp_path / "big.dcm", frames=4)  # declares 4 x 64 x 64 = 16384 bytes
    assert thumbs.render_thumbnail(path, max_decoded_bytes=16383) is None
    assert thumbs.render_thumbnail(path, max_decoded_bytes=16384) is not None
    assert thumbs.render_thumbnail(path) is not None  # 0: no limit


def test_thumbnails_are_cached_by_path_and_mtime(tmp_path):
    path = image_file(tmp_path / "one.dcm", frames=1, value=200)
    first = thumbs.render_thumbnail(path)
    hits = thumbs._render.cache_info().hits
    assert thumbs.render_thumbnail(path) == first
    assert thumbs._render.cache_info().hits == hits + 1
    # Rewritten in place (a new mtime): rendered again, the new image shown.
    image_file(path, frames=1, value=0)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert thumbs.render_thumbnail(path) != first
