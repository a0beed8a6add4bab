"""Burned-in text redaction on real DICOM: every photometric interpretation, transfer syntax,
multi-frame, the three modes; Tesseract checks that planted strings are gone afterwards."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomgen import PHI, make_instance
from pydicom import Dataset
from pydicom.dataset import Dataset as Item
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from textimages import (
    Planted,
    blank_image,
    draw_text,
    found_strings,
    name_variants,
    tesseract_text,
    text_image,
    to_stored,
)

from deid_node.config import DeidConfig, PixelsConfig, RegionTemplate, parse_config
from deid_node.deid.pixels import RedactionLimitError, redact_pixels
from deid_node.deid.sensitive import SensitiveTextClassifier
from deid_node.deid.textscan import TEXT_RULES, text_boxes
from deid_node.errors import ConfigError, PixelError
from deid_node.modes import DeidentifyRedactTextMode as Mode
from deid_node.modes import SeriesPolicy
from deid_node.ocr import TextBox
from deid_node.pipeline import DeidJob, PipelineSettings, SourceFile, deidentify_file, run_series

# The generated images carry big text on small frames (4 lines of up to 25 px on 640x480):
# their redaction changes 3-8% of a frame, above the 5% default guard, tested on its own below.
CONFIG = PixelsConfig(ocr_engine="rapidocr", max_redacted_fraction=0.25)
H, W = 480, 640
# Detector boxes are a little looser than the glyph boxes the generator reports.
SLACK = CONFIG.margin_px + 10


def display(ds: Dataset) -> list[np.ndarray]:
    """What a viewer shows, per frame, as uint8 — independent of the code under test."""
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pi = ds.PhotometricInterpretation
    samples = ds.SamplesPerPixel
    if frames == 1:
        array = array[np.newaxis]
    out = []
    for frame in array:
        if pi == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)
            frame = (rgb / max(1, rgb.max()) * 255).astype(np.uint8)
        elif samples == 1:
            f = frame.astype(np.float64)
            f = (f - f.min()) / max(1.0, f.max() - f.min()) * 255
            frame = f.astype(np.uint8)
            if pi == "MONOCHROME1":
                frame = 255 - frame
        out.append(np.ascontiguousarray(frame))
    return out


def stored_frames(ds: Dataset) -> np.ndarray:
    array = ds.pixel_array
    return array if "NumberOfFrames" in ds and int(ds.NumberOfFrames) > 1 else array[np.newaxis]


def allowed_mask(planted: list[Planted], shape: tuple[int, int]) -> np.ndarray:
    """Text boxes + slack; a line's ends also get the padding pixels.py gives them (a share of
    the detected height, which runs up to ~1.3x the glyph box)."""
    mask = np.zeros(shape, bool)
    for p in planted:
        mask |= p.mask(shape, SLACK, SLACK + p.h)
    return mask


def assert_redacted(before: np.ndarray, ds: Dataset, planted: list[Planted]) -> None:
    """No planted identifying string readable; nothing changed outside the text boxes."""
    after = stored_frames(ds)
    assert after.shape == before.shape
    allowed = allowed_mask(planted, before.shape[1:3])
    for index in range(before.shape[0]):
        diff = before[index] != after[index]
        if diff.ndim == 3:
            diff = diff.any(axis=2)
        assert not (diff & ~allowed).any(), f"frame {index}: pixels changed outside text boxes"
    targets = [p for p in planted if not p.clinical]
    for image in display(ds):
        assert found_strings(tesseract_text(image), targets) == []


def planted_instance(
    photometric: str, seed: int = 1, bits: int = 8, frames: int = 1
) -> tuple[Dataset, list[Planted]]:
    """An instance whose pixels carry four PHI strings and one clinical label."""
    image, planted = text_image(seed, H, W, colour=photometric != "MONOCHROME2", min_scale=0.6)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        array = image
    elif photometric == "PALETTE COLOR":
        array = to_stored(image)  # index i -> grey i
    else:
        array = to_stored(image, bits, monochrome1=photometric == "MONOCHROME1")
    colour = "RGB" if array.ndim == 3 else "MONOCHROME2"
    ds = make_instance("US", photometric=colour, pixel_array=array)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = np.stack([array] * frames).tobytes()
    if photometric == "PALETTE COLOR":
        ramp = np.arange(256, dtype=np.uint16) * 257
        ds.PhotometricInterpretation = "PALETTE COLOR"
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", ramp.tobytes())
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):
        ycc = convert_color_space(image, "RGB", "YBR_FULL")
        ds.set_pixel_data(ycc, photometric, 8, generate_instance_uid=False)
    elif photometric == "MONOCHROME1":
        ds.PhotometricInterpretation = "MONOCHROME1"
    if bits != 8:
        ds.BitsStored = bits
        ds.HighBit = bits - 1
    return ds, planted


# --- REDACT_NO_TEXT -----------------------------------------------------------------------


def test_no_text_mode_leaves_pixel_data_byte_identical_without_decoding() -> None:
    ds, _ = planted_instance("RGB")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    before = ds.PixelData
    outcome = redact_pixels(ds, Mode.REDACT_NO_TEXT, CONFIG)
    assert not outcome.changed and outcome.boxes == 0 and outcome.engine is None
    assert ds.PixelData == before
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit


def test_no_text_mode_does_not_import_ocr_engines() -> None:
    code = (
        "import sys; from deid_node.deid import pixels; "
        "bad = [m for m in ('torch', 'easyocr', 'rapidocr_onnxruntime', 'onnxruntime') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- every photometric interpretation, REDACT_ALL_TEXT ----------------------------------------


@pytest.mark.ocr
@pytest.mark.parametrize(
    ("photometric", "bits"),
    [
        ("MONOCHROME2", 8),
        ("MONOCHROME2", 12),
        ("MONOCHROME2", 16),
        ("MONOCHROME1", 12),
        ("RGB", 8),
        ("YBR_FULL", 8),
        ("YBR_FULL_422", 8),
        ("PALETTE COLOR", 8),
    ],
)
def test_all_text_redacted_for_every_photometric_interpretation(
    photometric: str, bits: int
) -> None:
    ds, planted = planted_instance(photometric, seed=bits + len(photometric), bits=bits)
    before = stored_frames(ds).copy()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed and outcome.boxes >= 4 and outcome.engine == "rapidocr"
    assert outcome.frames == 1
    expected_pi = "RGB" if photometric.startswith("YBR") else photometric
    assert ds.PhotometricInterpretation == expected_pi
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.BitsStored == bits
    assert_redacted(before, ds, planted)


@pytest.mark.ocr
def test_text_boxes_are_filled_flat_with_the_colour_around_them() -> None:
    """Text on a flat bar leaves the bar's colour, not a black rectangle; only glyphs change."""
    image = np.full((H, W), 90, np.uint8)
    image[:60] = 170  # a light header bar
    text = draw_text(image, "PIDQX778812", (20, 40), scale=0.9, colour=(20, 20, 20))
    image[200:, :] = blank_image(3, H, W)[200:, :]
    ds = make_instance("US", photometric="MONOCHROME2", pixel_array=image)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed
    after = ds.pixel_array
    box = after[text.y + 2 : text.y + text.h - 2, text.x + 2 : text.x + text.w - 2]
    assert (box == 170).all()
    glyphs = int((image[:60] != 170).sum())
    assert outcome.changed_fraction <= glyphs / image.size + 1e-6


@pytest.mark.ocr
def test_template_regions_of_monochrome1_are_filled_with_display_black() -> None:
    ds, _ = planted_instance("MONOCHROME1", bits=12)
    template = RegionTemplate("", "", None, None, ((0, 0, 50, 20),))
    config = PixelsConfig(templates=(template,), max_redacted_fraction=0.25)
    redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
    assert (ds.pixel_array[0:20, 0:50] == ds.pixel_array.max()).all()  # highest shows black


@pytest.mark.ocr
def test_window_center_width_drive_detection_of_16_bit_images() -> None:
    ds, planted = planted_instance("MONOCHROME2", bits=16)
    stored = (ds.pixel_array.astype(np.uint32) // 16 + 1000).astype(np.uint16)
    stored[0, 0] = 65535  # one hot pixel would crush a min-max stretch; the window ignores it
    ds.PixelData = stored.tobytes()
    ds.WindowCenter, ds.WindowWidth = 3048, 4096
    before = stored_frames(ds).copy()
    assert redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG).changed
    assert_redacted(before, ds, planted)


# --- transfer syntaxes -------------------------------------------------------------------------


def _compress_with_dcmtk(ds: Dataset, tool: list[str], tmp: Path) -> Dataset:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} (DCMTK) is not installed")
    source, target = tmp / "in.dcm", tmp / "out.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run([*tool, str(source), str(target)], check=True, capture_output=True)
    return pydicom.dcmread(target)


def _compressed(syntax: UID, photometric: str, tmp: Path) -> tuple[Dataset, list[Planted]]:
    ds, planted = planted_instance(photometric, seed=7)
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    elif syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif syntax == JPEG2000:
        ds.compress(JPEG2000, j2k_psnr=[60], generate_instance_uid=False)
    elif syntax == JPEGBaseline8Bit:
        ds = _compress_with_dcmtk(ds, ["dcmcjpeg", "+eb", "+q", "95"], tmp)
    elif syntax == JPEGLosslessSV1:
        ds = _compress_with_dcmtk(ds, ["dcmcjpeg", "+e1"], tmp)
    elif syntax == JPEGLSLossless:
        ds = _compress_with_dcmtk(ds, ["dcmcjpls", "+el"], tmp)
    elif syntax == JPEGLSNearLossless:
        ds = _compress_with_dcmtk(ds, ["dcmcjpls", "+en", "+md", "2"], tmp)
    assert ds.file_meta.TransferSyntaxUID == syntax
    return ds, planted


LOSSY = {JPEGBaseline8Bit, JPEG2000, JPEGLSNearLossless}


@pytest.mark.ocr
@pytest.mark.parametrize(
    ("syntax", "photometric"),
    [
        (RLELossless, "RGB"),
        (RLELossless, "MONOCHROME2"),
        (JPEG2000Lossless, "RGB"),
        (JPEG2000, "MONOCHROME2"),
        (JPEGBaseline8Bit, "RGB"),
        (JPEGLosslessSV1, "MONOCHROME2"),
        (JPEGLSLossless, "MONOCHROME2"),
        (JPEGLSNearLossless, "RGB"),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_compressed_transfer_syntaxes_are_decoded_redacted_and_written_uncompressed(
    syntax: UID, photometric: str, tmp_path: Path
) -> None:
    ds, planted = _compressed(syntax, photometric, tmp_path)
    source_pi = ds.PhotometricInterpretation
    ds.IconImageSequence = Sequence([Item()])
    before = stored_frames(ds).copy()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "IconImageSequence" not in ds
    if source_pi.startswith("YBR"):
        assert ds.PhotometricInterpretation == "RGB"
    if syntax in LOSSY:
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod
    else:
        assert ds.get("LossyImageCompression", "00") == "00"
    if ds.SamplesPerPixel == 3:
        assert ds.PlanarConfiguration == 0
    assert_redacted(before, ds, planted)
    # The result is a valid file that reads back identically.
    ds.save_as(tmp_path / "redacted.dcm", enforce_file_format=True)
    again = pydicom.dcmread(tmp_path / "redacted.dcm")
    assert np.array_equal(again.pixel_array, ds.pixel_array)


@pytest.mark.ocr
@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPEG-LL.dcm",
        "SC_rgb_rle_2frame.dcm",
        "US1_J2KR.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_reference_files_from_pydicom_decode(name: str) -> None:
    """Files other encoders wrote (pydicom's test data) decode and scan without error."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    before = ds.PixelData
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.frames == int(ds.get("NumberOfFrames", 1) or 1)
    if not outcome.changed:
        assert ds.PixelData == before


def test_undecodable_pixel_data_raises_pixel_error_without_patient_values() -> None:
    ds, _ = planted_instance("RGB")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 broken \xff\xd9"])
    with pytest.raises(PixelError) as info:
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    for value in PHI.values():
        assert value not in str(info.value)


@pytest.mark.parametrize("mode", [Mode.REDACT_ALL_TEXT, Mode.REDACT_SENSITIVE_TEXT])
def test_float_pixel_data_fails_closed_when_a_scan_is_asked_for(mode: Mode) -> None:
    ds = make_instance("OT", photometric="MONOCHROME2")
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.zeros((64, 64), np.float32).tobytes()
    with pytest.raises(PixelError, match="float pixel data"):
        redact_pixels(ds, mode, CONFIG)
    outcome = redact_pixels(ds, Mode.REDACT_NO_TEXT, CONFIG)  # no scan asked: passes untouched
    assert not outcome.changed and "FloatPixelData" in ds


def test_one_bit_pixel_data_fails_closed() -> None:
    ds = make_instance("OT", photometric="MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.packbits(np.ones(64 * 64, np.uint8)).tobytes()
    with pytest.raises(PixelError, match="BitsAllocated 1"):
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)


def test_instance_without_any_pixel_data_has_nothing_to_scan() -> None:
    ds = make_instance("OT", photometric="MONOCHROME2")
    del ds.PixelData
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert not outcome.changed and "no_pixel_data" in outcome.reasons


# --- BurnedInAnnotation ---------------------------------------------------------------------


@pytest.mark.ocr
def test_all_text_redaction_sets_burned_in_annotation_no() -> None:
    ds, _ = planted_instance("RGB", seed=21)
    ds.BurnedInAnnotation = "YES"
    assert redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG).changed
    assert ds.BurnedInAnnotation == "NO"


@pytest.mark.ocr
def test_sensitive_redaction_leaves_burned_in_annotation_alone() -> None:
    ds, _ = planted_instance("RGB", seed=21)
    ds.BurnedInAnnotation = "YES"
    outcome = redact_pixels(ds, Mode.REDACT_SENSITIVE_TEXT, CONFIG, [PHI["PatientName"]])
    assert outcome.changed  # names and IDs blanked, the clinical label stays
    assert ds.BurnedInAnnotation == "YES"


@pytest.mark.ocr
@pytest.mark.parametrize("mode", [Mode.REDACT_ALL_TEXT, Mode.REDACT_SENSITIVE_TEXT])
def test_burned_in_annotation_yes_without_any_text_found_is_held_for_review(mode: Mode) -> None:
    """The header says text is burned in; OCR reads none and no template matches: the device
    knows better than a detector that came up empty, so the file must not leave."""
    ds = make_instance("US", photometric="MONOCHROME2", pixel_array=blank_image(8, H, W))
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(PixelError, match="BurnedInAnnotation is YES but OCR read no text"):
        redact_pixels(ds, mode, CONFIG)
    ds.BurnedInAnnotation = "NO"
    assert not redact_pixels(ds, mode, CONFIG).changed


# --- hard text: low contrast, cut by the edge -------------------------------------------------


@pytest.mark.ocr
def test_low_contrast_and_edge_cut_text_is_blanked_whole() -> None:
    """Mid-grey text on a noisy background of the same range, and a line running off the right
    edge: every ink pixel must be blanked, not just the part the detector is sure of."""
    image = blank_image(12, H, W)
    clean = image.copy()
    planted = [
        draw_text(image, "Montague Zyxwortha", (20, 40), scale=0.8, colour=(85, 85, 85)),
        draw_text(image, "DOB 1943-11-07", (30, 460), scale=0.5, colour=(85, 85, 85), thickness=1),
        draw_text(image, "PIDQX778812", (W - 120, 250), scale=0.9),
    ]
    ds = make_instance("US", photometric="MONOCHROME2", pixel_array=image)
    redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    after = ds.pixel_array
    for p in planted:
        ink = (image != clean) & p.mask(image.shape)
        blanked = (after != image) | (after == after.min())
        assert blanked[ink].mean() >= 0.99, p.text


# --- multi-frame ----------------------------------------------------------------------------


@pytest.mark.ocr
def test_multi_frame_cine_reuses_static_overlay_and_rescans_changes() -> None:
    image, planted = text_image(3, H, W, colour=True, min_scale=0.6)
    frames = np.stack([image] * 5)
    rng = np.random.default_rng(0)
    for index in (2, 3, 4):  # the sector moves, the overlay stays
        frames[index, 150:330, 200:440] = rng.integers(0, 120, (180, 240, 3), dtype=np.uint8)
    late = draw_text(frames[4], "10:15:31 QUILLIAM", (230, 420), scale=0.8, thickness=2)
    ds = make_instance("US", photometric="RGB", pixel_array=image)
    ds.NumberOfFrames = 5
    ds.PixelData = frames.tobytes()
    before = frames.copy()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed and outcome.frames == 5
    assert "frames_reused=1" in outcome.reasons  # frame 1 equals frame 0; OCR'd 4 of 5
    assert_redacted(before, ds, [*planted, late])
    assert int(ds.NumberOfFrames) == 5


# --- no text, templates, hints, sizes -----------------------------------------------------------


@pytest.mark.ocr
def test_image_without_text_is_left_untouched() -> None:
    ds = make_instance("US", photometric="MONOCHROME2", pixel_array=blank_image(5, H, W))
    ds.compress(RLELossless, generate_instance_uid=False)
    before = ds.PixelData
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert not outcome.changed and outcome.boxes == 0
    assert ds.PixelData == before and ds.file_meta.TransferSyntaxUID == RLELossless


@pytest.mark.ocr
def test_template_regions_are_filled_and_named_in_reasons() -> None:
    ds = make_instance("US", photometric="MONOCHROME2", pixel_array=blank_image(6, H, W))
    ds.ManufacturerModelName = "X1"
    ds.BurnedInAnnotation = "YES"
    template = RegionTemplate("ACME", "X1", H, W, ((0, 0, 100, 20),))
    other = RegionTemplate("OTHER", "X1", None, None, ((0, 100, 50, 50),))
    config = PixelsConfig(
        ocr_engine="rapidocr", templates=(template, other), max_redacted_fraction=0.25
    )
    before = ds.pixel_array.copy()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
    assert outcome.changed
    assert "template:ACME/X1" in outcome.reasons and "burned_in_annotation=YES" in outcome.reasons
    after = ds.pixel_array
    assert (after[0:20, 0:100] == before.min()).all()
    assert np.array_equal(after[20:], before[20:])


@pytest.mark.ocr
def test_large_images_are_downscaled_for_detection() -> None:
    image, planted = text_image(9, 1800, 2400, colour=False, min_scale=1.8, max_scale=2.4)
    ds = make_instance("CR", photometric="MONOCHROME2", pixel_array=to_stored(image, 12))
    ds.BitsStored, ds.HighBit = 12, 11
    before = stored_frames(ds).copy()
    outcome = redact_pixels(
        ds, Mode.REDACT_ALL_TEXT, PixelsConfig(max_detect_side=1200, max_redacted_fraction=0.25)
    )
    assert outcome.changed
    assert_redacted(before, ds, planted)


# --- REDACT_SENSITIVE_TEXT ----------------------------------------------------------------------


@pytest.mark.ocr
def test_sensitive_mode_redacts_identifiers_and_keeps_clinical_labels() -> None:
    rng = np.random.default_rng(11)
    image = np.repeat(blank_image(11, H, W)[:, :, None], 3, axis=2)
    phi = [
        draw_text(image, "MONTAGUE ZYXWORTHA", (10, 30), scale=0.8),
        draw_text(image, "PIDQX778812", (420, 30), scale=0.8),
        draw_text(image, "12/03/2024 10:15", (10, 460), scale=0.8),
        draw_text(image, "John Smith", (420, 460), scale=0.8),
    ]
    clinical = [
        draw_text(image, "DEPTH 16cm", (480, 200), scale=0.7, clinical=True),
        draw_text(image, "5.0 MHz", (480, 250), scale=0.7, clinical=True),
        draw_text(image, "GAIN 50%", (480, 300), scale=0.7, clinical=True),
    ]
    del rng
    ds = make_instance("US", photometric="RGB", pixel_array=image)
    before = stored_frames(ds).copy()
    identifiers = [PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"]]
    outcome = redact_pixels(ds, Mode.REDACT_SENSITIVE_TEXT, CONFIG, identifiers)
    assert outcome.changed and outcome.boxes == 4
    assert "sensitive:identifier" in outcome.reasons and "sensitive:date" in outcome.reasons
    for reason in outcome.reasons:
        assert not any(v.upper() in reason.upper() for v in PHI.values())
    assert_redacted(before, ds, [*phi, *clinical])
    after = stored_frames(ds)[0]
    for label in clinical:
        region = (slice(label.y, label.y + label.h), slice(label.x, label.x + label.w))
        assert np.array_equal(after[region], before[0][region])


@pytest.mark.parametrize(
    ("text", "identifying"),
    [
        ("ZYXWORTHA MONTAGUE", True),
        ("Montague, Zyxworlha", True),  # one OCR error
        ("PID QX778812", True),
        ("07/11/1943", True),
        ("12 Mar 2024", True),
        ("10:15:30", True),
        ("John Smith", True),
        ("Name:", True),
        ("221 Fenwhistle Road", True),
        ("ABC12345", True),
        ("5.0 MHz", False),
        ("Depth 16cm", False),
        ("L", False),
        ("R", False),
        ("Gain 50%", False),
        ("-30dB", False),
        ("TIS 0.4 MI 1.1", False),
        ("C5-1", False),
        ("2/3", False),
        ("", False),
    ],
)
def test_sensitive_text_classifier(text: str, identifying: bool) -> None:
    classifier = SensitiveTextClassifier([PHI["PatientName"], PHI["PatientID"], "19431107"])
    assert (classifier.reason(text) is not None) is identifying


# --- real images without text: anatomy is not text ------------------------------------------


@pytest.mark.ocr
@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # pydicom: CT 128x128, vertebra and lung edges
        "MR_small.dcm",  # pydicom: MR 64x64
        "693_UNCI.dcm",  # pydicom-data: CT head 512x512, 14 of 16 bits
        "MR-SIEMENS-DICOM-WithOverlays.dcm",  # pydicom-data: abdominal MR 484x484
    ],
)
def test_real_ct_and_mr_images_are_not_taken_for_text(name: str) -> None:
    """Detectors see strokes in vessels, vertebrae and sulci; text-only boxes leave them alone
    (before text-only boxes, up to 55% of such images was blacked out)."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    before = stored_frames(ds).copy()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, PixelsConfig())  # the default guard
    assert outcome.changed_fraction < 0.005
    changed = (stored_frames(ds) != before).mean()
    assert changed < 0.005, f"{changed:.2%} of {name} changed"


@pytest.mark.ocr
def test_real_ultrasound_text_is_blanked_within_the_default_guard() -> None:
    """pydicom-data's US1 (text on black, lossy history) and OBXXXX1A (text on a blue bar,
    big endian, palette): every line gone, a few % of the frame changed."""
    for name in ("US1_UNCI.dcm", "OBXXXX1A_expb.dcm"):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        read_before = tesseract_text(display(ds)[0])
        outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, PixelsConfig())
        assert outcome.changed and 0 < outcome.changed_fraction < 0.05
        read_after = normalise_words(tesseract_text(display(ds)[0]))
        words = [w for w in normalise_words(read_before) if len(w) >= 5 and w.isalpha()]
        assert words or name != "US1_UNCI.dcm"  # Tesseract read US1's words before
        assert not [w for w in words if w in read_after], name


def normalise_words(text: str) -> list[str]:
    return ["".join(c for c in w.upper() if c.isalnum()) for w in text.split()]


# --- the guard on how much may change ------------------------------------------------------------


@pytest.mark.ocr
def test_redaction_changing_more_than_max_redacted_fraction_is_held_for_review() -> None:
    ds, _ = planted_instance("RGB", seed=5)
    before = ds.PixelData
    config = PixelsConfig(max_redacted_fraction=0.01)
    with pytest.raises(RedactionLimitError, match="pixels.max_redacted_fraction") as info:
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
    assert info.value.outcome.changed_fraction > 0.01
    assert isinstance(info.value, PixelError)  # the pipeline quarantines every PixelError
    # The same image passes with room to spare, and says how much changed.
    ds.PixelData = before
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert 0.01 < outcome.changed_fraction < 0.25


@pytest.mark.ocr
def test_multi_frame_reports_the_largest_share_of_one_frame() -> None:
    image, _ = text_image(4, H, W, colour=True, min_scale=0.6)
    empty = blank_image(4, H, W)
    frames = np.stack([np.repeat(empty[:, :, None], 3, axis=2), image])
    ds = make_instance("US", photometric="RGB", pixel_array=image)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    one = make_instance("US", photometric="RGB", pixel_array=image.copy())
    single = redact_pixels(one, Mode.REDACT_ALL_TEXT, CONFIG).changed_fraction
    both = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG).changed_fraction
    assert both == pytest.approx(single, rel=0.05)  # not halved by the empty frame


# --- overlays in unused high bits -----------------------------------------------------------------


def overlay_instance(syntax: UID = ExplicitVRLittleEndian) -> tuple[Dataset, np.ndarray]:
    """12-bit MR whose bit 15 draws a rectangle and a word, as old devices stored overlays."""
    rng = np.random.default_rng(15)
    values = rng.integers(0, 4096, (256, 256), dtype=np.uint16)
    overlay = np.zeros((256, 256), np.uint8)
    overlay[20:40, 20:200] = 1
    draw_text(overlay, "QUILLIAM", (30, 120), scale=1.5, colour=(1, 1, 1), thickness=3)
    raw = values | (overlay.astype(np.uint16) << 15)
    ds = make_instance("MR", photometric="MONOCHROME2", pixel_array=values)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = raw.astype(">u2" if syntax == ExplicitVRBigEndian else "<u2").tobytes()
    return ds, values


def raw_high_bits(ds: Dataset) -> int:
    order = ">" if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian else "<"
    raw = np.frombuffer(ds.PixelData, f"{order}u2")
    return int(np.count_nonzero(raw >> 12))


@pytest.mark.ocr
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=str)
def test_overlay_in_bit_15_is_gone_from_every_output(mode: Mode, syntax: UID, tmp_path) -> None:
    ds, values = overlay_instance(syntax)
    assert raw_high_bits(ds) > 0 and np.array_equal(ds.pixel_array, values)  # pydicom masks
    outcome = redact_pixels(ds, mode, CONFIG, [PHI["PatientName"]])
    assert outcome.unused_bits_cleared and "unused_bits_cleared" in outcome.reasons
    assert raw_high_bits(ds) == 0
    assert np.array_equal(ds.pixel_array, values)  # the image itself is untouched
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    again = pydicom.dcmread(tmp_path / "out.dcm")
    assert raw_high_bits(again) == 0 and np.array_equal(again.pixel_array, values)


def test_signed_sign_extension_is_not_an_overlay() -> None:
    values = np.array([[-1000, -1, 0, 2047]], np.int16)
    ds = make_instance("CT", photometric="MONOCHROME2", pixel_array=values.astype(np.uint16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = values.astype("<i2").tobytes()  # sign-extended into bits 12-15
    before = ds.PixelData
    outcome = redact_pixels(ds, Mode.REDACT_NO_TEXT, CONFIG)
    assert not outcome.unused_bits_cleared and ds.PixelData == before
    dirty = values.astype("<i2").view("<u2") ^ np.uint16(1 << 14)  # bit 14 flipped: an overlay
    ds.PixelData = dirty.tobytes()
    assert redact_pixels(ds, Mode.REDACT_NO_TEXT, CONFIG).unused_bits_cleared
    assert np.array_equal(ds.pixel_array, values)


# --- every encoding ---------------------------------------------------------------------------------


@pytest.mark.ocr
def test_big_endian_pixel_data_is_redacted_like_little_endian(tmp_path) -> None:
    ds, planted = planted_instance("MONOCHROME2", seed=31, bits=12)
    before = stored_frames(ds).copy()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = before[0].astype(">u2").tobytes()
    assert np.array_equal(ds.pixel_array, before[0])
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian  # pixels in the file's order
    assert_redacted(before, ds, planted)
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert np.array_equal(pydicom.dcmread(tmp_path / "out.dcm").pixel_array, ds.pixel_array)


@pytest.mark.ocr
def test_big_endian_reference_files_are_redacted(tmp_path) -> None:
    """pydicom's own big-endian files: RGB, 16-bit palette US, 10-frame MR."""
    pairs = {
        "MR_small_bigendian.dcm": "MR_small.dcm",
        "SC_rgb_expb_2frame.dcm": "SC_rgb_2frame.dcm",
        "gdcm-US-ALOKA-16_big.dcm": "gdcm-US-ALOKA-16.dcm",
    }
    for name, twin in pairs.items():
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        little = pydicom.dcmread(pydicom.data.get_testdata_file(twin))
        assert np.array_equal(ds.pixel_array, little.pixel_array)
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, PixelsConfig(max_redacted_fraction=0.25))
        ds.save_as(tmp_path / name, enforce_file_format=True)
        pydicom.dcmread(tmp_path / name).pixel_array  # noqa: B018 - it reads back


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.2.8.1", "Deflated Image Frame Compression"),
        ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
        ("1.2.840.10008.1.2.4.112", "JPEG XL"),
        ("1.2.3.4.5.6", "unknown transfer syntax"),
    ],
)
def test_undecodable_transfer_syntax_is_refused_with_its_name(uid: str, name: str) -> None:
    ds, _ = planted_instance("MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    for mode in Mode:  # REDACT_NO_TEXT too: pydicom could not write the file back
        with pytest.raises(PixelError, match=f"{name} \\({uid}\\)"):
            redact_pixels(ds, mode, CONFIG)


@pytest.mark.parametrize(
    "text",
    ["Mary Smith", "SMITH, MARY", "M. Smith", "smith mary", "SMITH^MARY", "Smlth Mary"],
)
def test_header_name_in_any_order_case_or_initial_is_identifying(text: str) -> None:
    classifier = SensitiveTextClassifier(["Smith^Mary"])
    assert classifier.reason(text) == "identifier"


# --- through the pipeline: report rows and quarantine ---------------------------------------------


def pipeline_settings(mode: Mode, **pixels: float) -> PipelineSettings:
    return PipelineSettings(
        deid=DeidConfig(redact_pixels_mode=mode),
        pixels=PixelsConfig(**pixels),
        conditions=(),
        policy=SeriesPolicy.PER_INSTANCE,
        secret=b"p" * 32,
        durable=False,
    )


@pytest.mark.ocr
def test_report_rows_give_the_fraction_changed_and_quarantine_past_the_guard(tmp_path) -> None:
    ds, _ = planted_instance("RGB", seed=5)
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    source = [SourceFile("in.dcm", tmp_path / "in.dcm")]
    held = run_series(
        source, pipeline_settings(Mode.REDACT_ALL_TEXT, max_redacted_fraction=0.01), tmp_path / "a"
    )
    row = held.results[0]
    assert row.state == "quarantined" and row.deid_path is None
    assert "pixels.max_redacted_fraction" in row.report["error"]
    assert row.report["pixels"]["changed_fraction"] > 0.01
    passed = run_series(
        source, pipeline_settings(Mode.REDACT_ALL_TEXT, max_redacted_fraction=0.25), tmp_path / "b"
    )
    row = passed.results[0]
    assert row.state == "processed"
    assert 0.01 < row.report["pixels"]["changed_fraction"] < 0.25


def test_no_text_mode_clears_overlay_bits_of_large_native_pixel_data(tmp_path) -> None:
    """Large native pixel data is normally streamed from file to file in REDACT_NO_TEXT; with
    unused high bits it is read, and the overlay there cleared."""
    rng = np.random.default_rng(3)
    values = rng.integers(0, 4096, (1024, 1024), dtype=np.uint16)  # 2 MiB: above streaming size
    ds = make_instance("MR", photometric="MONOCHROME2", pixel_array=values)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    raw = values.copy()
    raw[100:140, 100:900] |= 1 << 15
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    outcome = deidentify_file(
        DeidJob(tmp_path / "in.dcm", tmp_path / "out"), pipeline_settings(Mode.REDACT_NO_TEXT)
    )
    assert outcome.error is None and outcome.pixels["unused_bits_cleared"]
    written = pydicom.dcmread(outcome.path)
    assert raw_high_bits(written) == 0 and np.array_equal(written.pixel_array, values)


def test_text_boxes_keep_confident_reads_and_the_unread_rest_of_their_line() -> None:
    rule = TEXT_RULES["rapidocr"]
    name = TextBox(10, 10, 120, 20, "Montague zy", 0.99)
    rest = TextBox(140, 12, 56, 16, "", 0.0)  # the line's end, unreadable
    vessel = TextBox(300, 200, 80, 90, "O", 0.67)  # anatomy: one glyph, low score
    sulcus = TextBox(100, 300, 230, 190, "Fim", 0.24)
    marker = TextBox(500, 20, 12, 14, "R", 0.95)
    faint = TextBox(10, 400, 90, 12, "IH=2", 0.51)
    text, parts = text_boxes([name, rest, vessel, sulcus, marker, faint], rule)
    assert text == [name, marker, faint] and parts == [rest]


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "5%", True])
def test_max_redacted_fraction_is_validated_and_named(value: object) -> None:
    folder = [{"name": "d", "type": "folder", "path": "/tmp/deid-node-unused"}]
    with pytest.raises(ConfigError, match="pixels.max_redacted_fraction"):
        parse_config({"pixels": {"max_redacted_fraction": value}, "destinations": folder})
    ok = parse_config({"pixels": {"max_redacted_fraction": 0.1}, "destinations": folder})
    assert ok.pixels.max_redacted_fraction == 0.1
    assert PixelsConfig().max_redacted_fraction == 0.05


@pytest.mark.ocr
@pytest.mark.parametrize("mode", [Mode.REDACT_ALL_TEXT, Mode.REDACT_SENSITIVE_TEXT])
def test_secondary_capture_with_the_header_name_in_other_forms_keeps_none_readable(
    mode: Mode,
) -> None:
    texts = (*name_variants("Smith^Mary")[:3], "PIDQX778812")
    image, planted = text_image(41, H, W, colour=True, texts=texts, min_scale=0.5)
    ds = make_instance("SC", photometric="RGB", pixel_array=image)
    ds.PatientName = "Smith^Mary"
    before = stored_frames(ds).copy()
    outcome = redact_pixels(ds, mode, CONFIG, ["Smith^Mary", "PIDQX778812"])
    assert outcome.boxes >= 4
    assert_redacted(before, ds, planted)
