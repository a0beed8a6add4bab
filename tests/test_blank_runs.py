"""[pixels] Blanking frames that share their boxes together (a cine whose text was found once)
fills exactly what blanking each frame alone fills, with each frame's own ring colour, and
measures the same changed share, on real and generated frames of every photometric kind.

The oracle is the frame-by-frame blanking the node used before (whole displayed frames
compared), written out here.
"""

from __future__ import annotations

import copy
from math import ceil

import numpy as np
import pydicom
import pytest
from dicomgen import make_instance
from pydicom.data import get_testdata_file

from deid_node.deid import pixels
from deid_node.deid.pixelcodec import DisplayMapper, decode, fill_value
from deid_node.deid.textscan import LINE_END_PAD
from deid_node.ocr import TextBox

MARGIN = 2


def frame_by_frame(decoded, display, frame_boxes, templates, fill, margin):
    """The node's blanking before runs of frames: one frame at a time, whole frames mapped."""
    total, worst = 0, 0.0
    frames = decoded.frames
    palette = decoded.photometric == "PALETTE COLOR"
    height, width = frames.shape[1:3]
    for index in range(frames.shape[0]):
        regions = [(b, max(margin, ceil(LINE_END_PAD * b.h)), margin) for b in frame_boxes[index]]
        regions += [(b, 0, 0) for b in templates]
        templated = [False] * len(frame_boxes[index]) + [True] * len(templates)
        rects = []
        for (box, mx, my), template in zip(regions, templated, strict=True):
            x0, y0 = max(0, box.x - mx), max(0, box.y - my)
            x1, y1 = min(width, box.x + box.w + mx), min(height, box.y + box.h + my)
            if x1 > x0 and y1 > y0:
                rects.append((x0, y0, x1, y1, template))
        total += len(regions)
        if not rects:
            continue
        before = display.image(index).astype(np.int16).copy()
        frame = frames[index]
        rings = []
        for x0, y0, x1, y1, template in rects:
            ring = None
            if not template:
                ox0, oy0 = max(0, x0 - 3), max(0, y0 - 3)
                ox1, oy1 = min(width, x1 + 3), min(height, y1 + 3)
                mask = np.ones((oy1 - oy0, ox1 - ox0), bool)
                mask[y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0] = False
                if mask.any():
                    values = frame[oy0:oy1, ox0:ox1][mask]
                    if palette:
                        indices, counts = np.unique(values, return_counts=True)
                        ring = indices[int(np.argmax(counts))]
                    else:
                        ring = np.median(values, axis=0).astype(frame.dtype)
            rings.append(ring)
        for (x0, y0, x1, y1, _), ring in zip(rects, rings, strict=True):
            frame[y0:y1, x0:x1] = fill if ring is None else ring
        diff = np.abs(display.image(index).astype(np.int16) - before) > 24
        changed = diff.any(axis=2) if diff.ndim == 3 else diff
        worst = max(worst, int(np.count_nonzero(changed)) / (height * width))
    return total, worst


def frame_boxes_for(count: int, height: int, width: int) -> list[list[TextBox]]:
    """Runs of frames sharing one list (longer than a run the node fills at once), frames of
    their own, overlapping boxes, boxes cut by the frame's edges, a box over the whole frame
    (no ring: display-black) and a frame with no box."""
    still = [
        TextBox(2, 3, width // 3, 6),
        TextBox(width // 4, 5, width // 3, 7),  # overlaps the first
        TextBox(width - 10, height - 5, 30, 9),  # cut by the right and bottom edges
        TextBox(width // 2, height // 2, 9, 5),
    ]
    out: list[list[TextBox]] = []
    for index in range(count):
        if index % 7 == 6:
            out.append([TextBox(index % width, (3 * index) % height, 12, 6), *still[:1]])
        elif index == count - 2:
            out.append([])
        elif index == count - 1:
            out.append([TextBox(0, 0, width, height)])
        else:
            out.append(still)
    return out


def _noisy_frames(ds: pydicom.Dataset, count: int, seed: int) -> None:
    """`ds`'s first frame repeated `count` times, each with noise of its own (so each frame's
    ring colours differ), as native little-endian pixel data."""
    first = decode(ds, index=0).frames[0]
    rng = np.random.default_rng(seed)
    top = np.iinfo(first.dtype).max if first.dtype.kind == "u" else 255
    frames = []
    for _ in range(count):
        noise = rng.integers(-20, 21, first.shape)
        frames.append(np.clip(first.astype(np.int64) + noise, 0, top).astype(first.dtype))
    ds.NumberOfFrames = count
    ds.PixelData = np.stack(frames).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian


def _real(name: str, frames: int | None) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    if frames is not None:
        _noisy_frames(ds, frames, seed=len(name))
    return ds


def _generated(photometric: str, frames: int) -> pydicom.Dataset:
    rng = np.random.default_rng(7)
    if photometric == "RGB":
        cine = rng.integers(0, 256, (frames, 60, 90, 3), dtype=np.uint8)
    else:
        cine = rng.integers(0, 4096, (frames, 60, 90), dtype=np.uint16)
    ds = make_instance("US", photometric=photometric, pixel_array=cine[0])
    ds.NumberOfFrames, ds.PixelData = frames, cine.tobytes()
    return ds


CASES = {
    "real MR, 10 frames, MONOCHROME2 16-bit (emri_small)": lambda: _real("emri_small.dcm", None),
    "real palette colour, 20 noisy frames (examples_palette)": lambda: _real(
        "examples_palette.dcm", 20
    ),
    "real RGB, 2 frames (SC_rgb_rle_2frame)": lambda: _real("SC_rgb_rle_2frame.dcm", None),
    "generated RGB, 37 frames": lambda: _generated("RGB", 37),
    "generated MONOCHROME1 12-bit, 20 frames": lambda: _generated("MONOCHROME1", 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frames_blanked_together_equal_frames_blanked_one_by_one(case: str) -> None:
    ds = CASES[case]()
    runs, alone = decode(ds), decode(ds)
    count, height, width = runs.frames.shape[:3]
    assert count >= 2 and np.array_equal(runs.frames, alone.frames)
    boxes = frame_boxes_for(count, height, width)
    templates = [TextBox(width - 8, 0, 8, 4)]
    fill = fill_value(ds, runs)
    got = pixels._blank(runs, DisplayMapper(ds, runs), boxes, templates, fill, MARGIN)
    want = frame_by_frame(alone, DisplayMapper(ds, alone), boxes, templates, fill, MARGIN)
    assert np.array_equal(runs.frames, alone.frames)
    assert got == want
    assert want[1] > 0  # the frames did change: the comparison is not between untouched copies
    # (each frame of a run has its own ring colour: one colour per run fails the equality)


def test_display_region_equals_the_cropped_displayed_frames() -> None:
    for make in CASES.values():
        ds = make()
        decoded = decode(ds)
        display = DisplayMapper(ds, copy.deepcopy(decoded))
        count, height, width = decoded.frames.shape[:3]
        x0, y0, x1, y1 = width // 5, height // 7, width // 2, height - 1
        region = display.region(slice(0, count), x0, y0, x1, y1)
        for index in range(count):
            assert np.array_equal(region[index], display.image(index)[y0:y1, x0:x1])
