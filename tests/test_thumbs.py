"""Console thumbnails: bounded by node.max_decoded_mb (declared size from the header), only
frame 0 decoded, cached by (path, mtime)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
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


# --- the review image of a file held for pixel review (/quarantine) ------------------------------


def held_for_review(tmp_path: Path) -> tuple[Path, list[list[int]], list]:
    """A US image with burned-in names run through the pipeline with a redaction limit it
    exceeds: quarantined, its report holding frame 0's regions. (path, regions, planted)."""
    from dicomgen import make_instance
    from textimages import text_image

    from deid_node.config import DeidConfig, PixelsConfig
    from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
    from deid_node.pipeline import PipelineSettings, SourceFile, run_series

    image, planted = text_image(7, 480, 640, colour=False, clinical=False, min_scale=0.7)
    path = tmp_path / "held.dcm"
    make_instance("US", pixel_array=image).save_as(path, enforce_file_format=True)
    settings = PipelineSettings(
        deid=DeidConfig(redact_pixels_mode=DeidentifyRedactTextMode.REDACT_ALL_TEXT),
        pixels=PixelsConfig(ocr_engine="rapidocr", max_redacted_fraction=0.001),
        conditions=(),
        policy=SeriesPolicy.PER_INSTANCE,
        secret=b"t" * 32,
        durable=False,
    )
    outcome = run_series([SourceFile("held.dcm", path)], settings, tmp_path / "out")
    (result,) = outcome.results
    assert result.state == "quarantined" and result.report["error"].endswith("held for review")
    assert outcome.summary["ocr_seconds"]["count"] == 1  # the pixel stage was timed
    return path, result.report["pixels"]["review_regions"], planted


@pytest.mark.ocr
def test_review_image_blanks_what_the_redaction_found_and_outlines_it(tmp_path):
    """Real OCR finds the planted names; the review image has none of them left for Tesseract
    to read, each region is outlined. Planted fault: rendered without its regions, the names
    are read in it."""
    from textimages import found_strings, tesseract_text

    path, regions, planted = held_for_review(tmp_path)
    assert len(regions) >= len(planted)
    assert all(len(r) == 4 and all(isinstance(v, int) for v in r) for r in regions)
    png = thumbs.render_review(path, regions)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (480, 640)  # under REVIEW_SIDE: not scaled
    assert found_strings(tesseract_text(image[:, :, ::-1]), planted) == []
    for x, y, w, h in regions:
        inside = image[y + 2 : y + h - 2, x + 2 : x + w - 2]
        assert inside.size == 0 or inside.max() == 0  # filled black
        assert tuple(image[y, x + w // 2]) == thumbs._OUTLINE  # outlined
    unblanked = thumbs.render_review(path, [])
    seen = cv2.imdecode(np.frombuffer(unblanked, np.uint8), cv2.IMREAD_COLOR)
    assert found_strings(tesseract_text(seen[:, :, ::-1]), planted) != []


def test_review_image_is_scaled_after_blanking_and_bounded_like_thumbnails(tmp_path):
    path = image_file(tmp_path / "big.dcm", frames=1, rows=1000, columns=1200, value=250)
    png = thumbs.render_review(path, [[0, 0, 600, 500]], side=300)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (250, 300)
    # The blanked top-left quarter stays black once scaled (the outline is drawn on it).
    assert image[5:120, 5:145].max() == 0 and image[5:120, 160:295].min() > 200
    assert thumbs.render_review(path, [], max_decoded_bytes=1000 * 1200 - 1) is None
    assert thumbs.render_review(tmp_path / "gone.dcm", []) is None
