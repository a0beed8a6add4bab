"""The OCR engines behind one protocol: both real engines find and read planted text."""

from __future__ import annotations

import os

import numpy as np
import pytest
from textimages import blank_image, draw_text, normalise

from deid_node.errors import ConfigError
from deid_node.ocr import TextBox, get_engine


def small_image() -> tuple[np.ndarray, list]:
    image = np.repeat(blank_image(2, 240, 320)[:, :, None], 3, axis=2)
    planted = [
        draw_text(image, "PIDQX778812", (10, 30), scale=0.8),
        draw_text(image, "5.0 MHz", (180, 220), scale=0.6, colour=(255, 255, 0), thickness=1),
    ]
    return image, planted


def covers(box: TextBox, planted) -> bool:
    cx, cy = planted.x + planted.w // 2, planted.y + planted.h // 2
    return box.x <= cx <= box.x + box.w and box.y <= cy <= box.y + box.h


def test_unknown_engine_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pixels.ocr_engine"):
        get_engine("tesseract")


@pytest.mark.ocr
def test_rapidocr_detects_and_reads_and_is_cached() -> None:
    engine = get_engine("rapidocr")
    assert engine is get_engine("rapidocr") and engine.name == "rapidocr"
    image, planted = small_image()
    boxes = engine.detect(image)
    assert all(b.text is None for b in boxes)
    assert all(any(covers(b, p) for b in boxes) for p in planted)
    grey = engine.recognize(image[:, :, 0].copy())  # HxW input works too
    texts = {normalise(b.text or "") for b in grey}
    assert "PIDQX778812" in texts
    assert engine.detect(np.zeros((50, 60), np.uint8)) == []


@pytest.mark.ocr
def test_rapidocr_boxes_are_in_input_coordinates_for_upscaled_and_wide_images() -> None:
    """Detection runs on an upscaled copy; boxes come back in the caller's pixels."""
    engine = get_engine("rapidocr")
    strip = np.zeros((40, 900, 3), np.uint8)
    planted = draw_text(strip, "PIDQX778812", (600, 30), scale=0.8)
    boxes = engine.detect(strip)
    assert any(covers(b, planted) for b in boxes)
    assert all(b.x >= 0 and b.y >= 0 and b.x + b.w <= 900 and b.y + b.h <= 40 for b in boxes)
    read = engine.recognize(strip)
    assert any(covers(b, planted) and normalise(b.text or "") == "PIDQX778812" for b in read)


@pytest.mark.ocr
@pytest.mark.slow
@pytest.mark.easyocr
def test_easyocr_detects_and_reads_offline() -> None:
    engine = get_engine("easyocr")
    assert engine is get_engine("easyocr") and engine.name == "easyocr"
    image, planted = small_image()
    boxes = engine.detect(image)
    assert all(any(covers(b, p) for b in boxes) for p in planted)
    texts = {normalise(b.text or "") for b in engine.recognize(image)}
    assert any("778812" in t for t in texts)  # EasyOCR reads the Q as O now and then


@pytest.mark.ocr
@pytest.mark.slow
@pytest.mark.easyocr
def test_easyocr_engine_redacts_through_pixels() -> None:
    from dicomgen import make_instance
    from textimages import found_strings, tesseract_text

    from deid_node.config import PixelsConfig
    from deid_node.deid.pixels import redact_pixels
    from deid_node.modes import DeidentifyRedactTextMode

    image, planted = small_image()
    ds = make_instance("US", photometric="RGB", pixel_array=image)
    outcome = redact_pixels(
        ds, DeidentifyRedactTextMode.REDACT_ALL_TEXT, PixelsConfig(ocr_engine="easyocr")
    )
    assert outcome.changed and outcome.engine == "easyocr"
    assert found_strings(tesseract_text(ds.pixel_array), planted[:1]) == []


@pytest.mark.ocr
def test_rapidocr_reads_a_crop_as_part_of_its_frame() -> None:
    """frame_shape: a crop is scaled for detection as its whole frame; boxes come back in the
    crop's pixels."""
    engine = get_engine("rapidocr")
    frame = np.repeat(blank_image(3, 600, 800)[:, :, None], 3, axis=2)
    planted = draw_text(frame, "PIDQX778812", (420, 330), scale=0.45, thickness=1)
    crop = frame[300:400, 400:640]
    read = engine.recognize(crop, frame_shape=(600, 800))
    local = planted.__class__(planted.text, planted.x - 400, planted.y - 300, planted.w, planted.h)
    assert any(covers(b, local) and normalise(b.text or "") == "PIDQX778812" for b in read)
    assert all(b.x + b.w <= 240 and b.y + b.h <= 100 for b in read)


@pytest.mark.ocr
def test_rapidocr_cpu_sessions_use_this_process_cores_without_spinning() -> None:
    """RapidOCR's own sessions spin while waiting (a core burnt on a shared CPU) and turn the
    memory arena off (the 1216x1600 feature maps re-allocated every run): ours do neither."""
    engine = get_engine("rapidocr", "cpu")
    for session in (engine._ocr.text_det.infer.session, engine._ocr.text_rec.session.session):
        options = session.get_session_options()
        assert options.intra_op_num_threads == len(os.sched_getaffinity(0))
        assert options.enable_cpu_mem_arena
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
