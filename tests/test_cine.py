"""Cines are read once when their text stands still, and frame by frame when it does not: every
planted string is gone from every frame, and the moving anatomy is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
from dicomgen import make_instance
from textimages import Planted, cine_frames, draw_text

from deid_node.config import PixelsConfig
from deid_node.deid.pixels import redact_pixels
from deid_node.modes import DeidentifyRedactTextMode as Mode

pytestmark = pytest.mark.ocr

# Generated frames carry big text on a mostly black frame; the guard is tested in test_pixels.
CONFIG = PixelsConfig(ocr_engine="rapidocr", max_redacted_fraction=0.25)
H, W = 480, 640
# Detector boxes are looser than the glyph boxes; a line's ends get pixels.py's padding too.
SLACK = CONFIG.margin_px + 10


def cine_instance(frames: np.ndarray):
    ds = make_instance("US", photometric="RGB", pixel_array=frames[0])
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    return ds


def redacted_frames(ds) -> np.ndarray:
    return ds.pixel_array.reshape(int(ds.NumberOfFrames), H, W, 3)


def assert_every_string_gone(
    before: np.ndarray, blank: np.ndarray, after: np.ndarray, planted: list[list[Planted]]
) -> None:
    """In every frame, >= 99% of each identifying string's ink pixels changed, and no pixel
    changed outside the planted boxes (+ slack): the moving sector keeps its anatomy."""
    for index, frame_planted in enumerate(planted):
        changed = (before[index] != after[index]).any(axis=2)
        ink = (before[index] != blank[index]).any(axis=2)
        allowed = np.zeros((H, W), bool)
        for p in frame_planted:
            allowed |= p.mask((H, W), SLACK, SLACK + p.h)
            if not p.clinical:
                own = ink & p.mask((H, W))
                assert changed[own].mean() >= 0.99, f"frame {index}: a planted string is readable"
        assert not (changed & ~allowed).any(), f"frame {index}: pixels changed outside text"


def test_static_text_over_a_moving_sector_is_read_once_and_blanked_in_every_frame() -> None:
    frames, planted = cine_frames(1, 12, "static", H, W)
    blank, _ = cine_frames(1, 12, "static", H, W, blank=True)
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed and outcome.frames == 12
    assert "cine_text_found_once" in outcome.reasons
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)


def test_moving_text_is_found_by_the_check_and_every_frame_is_read() -> None:
    frames, planted = cine_frames(2, 6, "moving", H, W)
    blank, _ = cine_frames(2, 6, "moving", H, W, blank=True)
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    # The first frame's boxes alone would leave the sliding string readable in frames 1-5.
    assert "cine_text_changes" in outcome.reasons
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)


def test_running_clock_changing_label_and_late_name_are_blanked_in_every_frame() -> None:
    frames, planted = cine_frames(3, 6, "changing", H, W)
    blank, _ = cine_frames(3, 6, "changing", H, W, blank=True)
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert outcome.changed and outcome.frames == 6
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)


def test_text_shown_only_between_the_sampled_frames_is_found_by_the_projection() -> None:
    """A name on the still border in frames 3-4 of 12 only: neither the first, the middle (6)
    nor the last frame shows it; the projection of moving pixels does."""
    frames, planted = cine_frames(4, 12, "static", H, W)
    blank, _ = cine_frames(4, 12, "static", H, W, blank=True)
    for index in (3, 4):
        flash = draw_text(frames[index], "Drovak Elspeth", (40, 300), scale=0.7)
        planted[index] = [*planted[index], flash]
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, CONFIG)
    assert "cine_text_changes" in outcome.reasons
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)
