"""[pixels] EasyOCR's batched frames (CUDA's path, forced on here on the CPU): the text crops of
several frames go through one recognizer call per padding width, and read exactly what each
frame read alone reads (box, text and score); where EasyOCR's internals have changed, the
engine falls back to readtext_batched, logs it once, and reads the same."""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import pytest
from structlog.testing import capture_logs
from textimages import blank_image, text_image

from deid_node.ocr.base import TextBox

pytestmark = [pytest.mark.ocr, pytest.mark.easyocr]

# Two lines a frame (the second string joins the first's line), a different widest one in each
# frame, and some of the same width in several frames: crops padded to different widths, and
# crops of different frames that share one.
TEXTS = (
    ("ZYXWORTHA^QUILLIAM", "L", "ACC 99"),
    ("PIDQX778812", "R", "DOB 1943"),
    ("DOB 1943", "L", "PIDQX778812"),
)


@pytest.fixture(scope="module")
def engine():
    from deid_node.ocr.easy import EasyOcrEngine

    return EasyOcrEngine("cpu", batches=True)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Three 320x240 frames of text, one with none at all (second), and the third again, moved
    4 pixels right (last): crops of the same widths in two frames."""
    drawn = [
        text_image(40 + i, 240, 320, texts=t, clinical=False, min_scale=0.6, max_scale=0.8)[0]
        for i, t in enumerate(TEXTS)
    ]
    blank = np.repeat(blank_image(7, 240, 320)[:, :, None], 3, axis=2)
    return [drawn[0], blank, *drawn[1:], np.roll(drawn[1], 4, axis=1)]


@pytest.fixture(scope="module")
def alone(engine, frames) -> list[list[TextBox]]:
    """Each frame read alone (Reader.readtext)."""
    return [engine.recognize(frame) for frame in frames]


def spy_get_text(monkeypatch, engine) -> list[tuple[int, int]]:
    """(padding width, crops) of each of EasyOCR's get_text calls from the batched path."""
    calls: list[tuple[int, int]] = []
    get_text = engine._internals.get_text

    def counted(character, img_h, img_w, recognizer, converter, image_list, *rest):
        calls.append((img_w, len(image_list)))
        return get_text(character, img_h, img_w, recognizer, converter, image_list, *rest)

    spied = dataclasses.replace(engine._internals, get_text=counted)
    monkeypatch.setattr(engine, "_internals", spied)
    return calls


def test_frames_read_together_read_what_each_frame_reads_alone(
    engine, frames, alone, monkeypatch
) -> None:
    from deid_node.ocr.easy import _THRESHOLDS, _read_boxes

    calls = spy_get_text(monkeypatch, engine)
    together = engine.recognize_batch(frames, batched=True)
    assert together == alone  # boxes, texts and scores, frame by frame, in order
    assert together[1] == [] and all(len(together[i]) == 2 for i in (0, 2, 3, 4))
    # ... and what readtext_batched, which the CPU and the fallback run, reads.
    old = engine._reader.readtext_batched(np.stack(frames), batch_size=1, **_THRESHOLDS)
    assert [_read_boxes(r, 240, 320) for r in old] == alone
    # The crops of different frames went through one call per padding width, and they had
    # several widths (a single call padding all to the widest reads some differently).
    crops = sum(len(f) for f in alone)
    assert len(calls) < crops and sum(n for _, n in calls) >= crops
    assert len({width for width, _ in calls}) > 1
    assert any("778812" in (b.text or "") for b in together[2])


def test_real_ultrasound_frames_read_together_read_what_each_reads_alone(engine) -> None:
    """pydicom's US1_UNCR (burned-in header text on a real scan): its top band, as is and
    shifted, with the other half of the band."""
    import pydicom
    from pydicom.data import get_testdata_file

    rgb = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array
    assert rgb.dtype == np.uint8 and rgb.shape == (480, 640, 3)
    band = rgb[:120]
    frames = [band[:, :320], band[:, 320:], np.roll(band[:, :320], (5, -9), axis=(0, 1))]
    alone = [engine.recognize(frame) for frame in frames]
    assert engine.recognize_batch(frames, batched=True) == alone
    assert sum(len(f) for f in alone) >= 6
    assert any("BAPTIST" in (b.text or "").upper() for b in alone[0])


def test_changed_easyocr_internals_fall_back_to_readtext_batched(
    engine, frames, alone, monkeypatch
) -> None:
    """An EasyOCR whose get_text takes other arguments: a TypeError at the first call, then
    readtext_batched for that chunk and every later one, logged once; the same readings."""

    def get_text(character, img_h, img_w, recognizer, converter, image_list):  # a newer one
        raise AssertionError("not reached: called with more arguments than it takes")

    monkeypatch.setattr(engine, "_internals_proven", False)
    monkeypatch.setattr(
        engine, "_internals", dataclasses.replace(engine._internals, get_text=get_text)
    )
    with capture_logs() as logs:
        assert engine.recognize_batch(frames, batched=True) == alone
        assert engine.recognize_batch(frames[:2], batched=True) == alone[:2]
    assert engine._internals is None
    fallbacks = [e for e in logs if e["event"] == "easyocr_batched_recognizer_unavailable"]
    assert len(fallbacks) == 1 and fallbacks[0]["error_type"] == "TypeError"
    assert fallbacks[0]["log_level"] == "warning" and "error" not in fallbacks[0]


def test_errors_after_the_internals_have_read_once_are_not_hidden(
    engine, frames, monkeypatch
) -> None:
    """Once the internals path has read a chunk, a TypeError in it is a real error: raised,
    not a silent switch to the other path."""
    engine.recognize_batch(frames[:1], batched=True)
    assert engine._internals_proven

    def broken(*args):
        raise TypeError("planted")

    monkeypatch.setattr(
        engine, "_internals", dataclasses.replace(engine._internals, get_text=broken)
    )
    with pytest.raises(TypeError, match="planted"):
        engine.recognize_batch(frames[:1], batched=True)


def test_out_of_gpu_memory_on_the_batched_recognizer_path_reads_in_halves(
    engine, frames, alone, monkeypatch
) -> None:
    """The CUDA out-of-memory fault planted in EasyOCR's detector (what the batched path calls
    first) for more than `fits` frames at once: the frames are read in halves, each once, after
    the failed call's frames are let go; the same readings. One frame that does not fit fails."""
    import torch

    detect = engine._reader.detect
    sizes: list[int] = []
    fits = 2
    failed: list[weakref.ref] = []
    held_at_retry: list[int] = []

    class Activations:
        pass

    def short_of_memory(img, **kwargs):
        sizes.append(len(img))
        held_at_retry.append(sum(ref() is not None for ref in failed))
        if len(img) > fits:
            activations = Activations()
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return detect(img, **kwargs)

    monkeypatch.setattr(engine._reader, "detect", short_of_memory)
    assert engine.recognize_batch(frames, batched=True) == alone
    # Tried whole, then in halves until each part fits: every frame read once in a part that fit.
    assert sizes[0] == 5 and sum(s for s in sizes if s <= fits) == 5 and len(sizes) > 2
    assert held_at_retry == [0] * len(sizes)
    assert engine._internals is not None  # out of memory is no reason to fall back
    fits = 0
    with pytest.raises(torch.OutOfMemoryError):
        engine.recognize_batch(frames[:1], batched=True)


class _NotCpu(str):
    """A device name torch reads as "cpu" but EasyOCR's `device == 'cpu'` test does not: its
    Reader.recognize then takes the branch it takes on CUDA (one get_text call per frame with
    batches of crops, not one per box), here on the CPU."""

    def __eq__(self, other: object) -> bool:
        return False if other == "cpu" else str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


def test_the_cuda_branch_groups_frames_by_width_and_reads_what_readtext_batched_reads(
    frames, monkeypatch
) -> None:
    """The grouping CUDA runs (batch_size > 1: each frame's crops padded to that frame's widest,
    frames of one width in one get_text call), run here on the CPU, against readtext_batched
    taking its own CUDA branch on the same reader: the same boxes, texts and scores."""
    from deid_node.ocr.easy import _THRESHOLDS, EasyOcrEngine, _read_boxes

    engine = EasyOcrEngine("cpu", batches=True)
    engine._batch = 16
    engine._reader.device = _NotCpu("cpu")
    assert engine._reader.device != "cpu"
    calls = spy_get_text(monkeypatch, engine)
    together = engine.recognize_batch(frames, batched=True)
    old = engine._reader.readtext_batched(np.stack(frames), batch_size=16, **_THRESHOLDS)
    assert together == [_read_boxes(r, 240, 320) for r in old]
    # One call per padding width, not per frame: fewer calls than frames with text, and at
    # least one call read the crops of several frames.
    with_text = sum(1 for f in together if f)
    assert len(calls) < with_text
    assert sum(n for _, n in calls) == sum(len(f) for f in together)
    assert any(n > max(len(f) for f in together) for _, n in calls)
