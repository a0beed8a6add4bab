"""EasyOCR (CRAFT detection + CRNN recognition on torch, CPU or CUDA) from the offline English
models; the `easyocr` extra."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from deid_node.log import get_logger, safe_error
from deid_node.ocr.base import TextBox, as_rgb, box_from_points

log = get_logger("deid_node.ocr.easy")

# Frames per detector batch on CUDA: 30 800x600 frames in one batch peaked at 14.5 GB of GPU
# memory on an H100 (DEVELOPERS.md, 2026-11-27); 8 keep one worker near 4 GB.
GPU_BATCH_FRAMES = 8
# Text crops per recognizer batch on CUDA (EasyOCR's default of 1 suits the CPU).
GPU_RECOGNIZER_BATCH = 16
_THRESHOLDS: dict[str, Any] = {"text_threshold": 0.6, "low_text": 0.3}
# Reader.recognize's defaults, as readtext_batched passes them (EasyOCR 1.7).
_DECODER, _BEAM_WIDTH, _CONTRAST_THS, _ADJUST_CONTRAST, _FILTER_THS = "greedy", 5, 0.1, 0.5, 0.003


@dataclass(frozen=True)
class _Internals:
    """The EasyOCR functions that Reader.readtext_batched and Reader.recognize call, taken from
    the module they call them in: `_read_frames` calls them the same way, with the text crops
    of all frames in one recognizer call per padding width instead of one call per frame (per
    box on the CPU). Internals, not EasyOCR's public interface: where one is missing or changed,
    the engine falls back to readtext_batched."""

    reformat_input_batched: Callable[..., Any]
    get_image_list: Callable[..., Any]
    get_text: Callable[..., Any]
    imgH: int


def _easyocr_internals() -> _Internals:
    """Raises ImportError or AttributeError where this EasyOCR lacks one of them."""
    import easyocr.easyocr as reader_module

    return _Internals(
        reader_module.reformat_input_batched,
        reader_module.get_image_list,
        reader_module.get_text,
        int(reader_module.imgH),
    )


class EasyOcrEngine:
    name = "easyocr"

    def __init__(
        self, device: Literal["cpu", "cuda"] = "cpu", *, batches: bool | None = None
    ) -> None:
        """batches: frames go to `recognize_batch` together (deid/textscan.py); by default
        on CUDA only, where a batch is faster than one frame at a time."""
        import easyocr  # lazy: pulls in torch
        import easyocr_en_models

        # gpu=True only once ocr.resolve_device has seen torch find a GPU: EasyOCR's own
        # fallback to the CPU would only warn.
        self._reader = easyocr.Reader(
            ["en"],
            gpu=device == "cuda",
            model_storage_directory=easyocr_en_models.model_dir(),
            download_enabled=False,
            verbose=False,
        )
        self.device: str = str(self._reader.device)
        self._batch = GPU_RECOGNIZER_BATCH if self.device == "cuda" else 1
        self.batches = self.device == "cuda" if batches is None else batches
        self._lock = threading.Lock()
        self._internals: _Internals | None = None
        # Until the internals path has read a chunk once, an AttributeError, TypeError or
        # ValueError in it is taken as an EasyOCR whose internals changed: readtext_batched
        # reads that chunk and every later one. After that, such an error is a real one.
        self._internals_proven = False
        try:
            self._internals = _easyocr_internals()
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            _log_fallback(exc)

    def detect(self, image: np.ndarray) -> list[TextBox]:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        with self._lock:
            horizontal, free = self._reader.detect(rgb, **_THRESHOLDS)
        boxes = []
        for x0, x1, y0, y1 in horizontal[0]:
            box = box_from_points([(x0, y0), (x1, y1)], height, width)
            if box is not None:
                boxes.append(box)
        for points in free[0]:
            box = box_from_points(points, height, width)
            if box is not None:
                boxes.append(box)
        return boxes

    def recognize(self, image: np.ndarray) -> list[TextBox]:
        rgb = as_rgb(image)
        with self._lock:
            result = self._reader.readtext(rgb, batch_size=self._batch, **_THRESHOLDS)
        return _read_boxes(result, *rgb.shape[:2])

    def recognize_batch(
        self, images: Sequence[np.ndarray], *, batched: bool | None = None
    ) -> list[list[TextBox]]:
        """`recognize` of each image. Same-sized images go through the detector
        GPU_BATCH_FRAMES at a time (readtext_batched) when `batched` (by default: `batches`,
        on CUDA only, as on the CPU a batch is no faster)."""
        rgbs = [as_rgb(image) for image in images]
        if batched is None:
            batched = self.batches
        if not batched or len({rgb.shape for rgb in rgbs}) > 1:
            return [self.recognize(rgb) for rgb in rgbs]
        out: list[list[TextBox]] = []
        for start in range(0, len(rgbs), GPU_BATCH_FRAMES):
            out.extend(self._read_together(rgbs[start : start + GPU_BATCH_FRAMES]))
        return out

    def _read_together(self, rgbs: list[np.ndarray]) -> list[list[TextBox]]:
        """The frames read together: one detector batch, and their text crops in one
        recognizer call per padding width (`_read_frames`). Out of GPU memory (a smaller card,
        other workers on it, a larger frame), the frames are read in halves, down to one at a
        time: the file is read more slowly, not failed (a failed file quarantines its whole
        series). A single frame that does not fit fails as before."""
        import torch

        chunk = np.stack(rgbs)
        try:
            with self._lock:
                results = self._read_chunk(chunk)
        except torch.OutOfMemoryError:
            if len(rgbs) == 1:
                raise
            results = None
        if results is None:
            # Split only after the except block: until it ends, the error's traceback keeps
            # the failed call's frames, and the batch and activations they hold on the GPU.
            del chunk
            with self._lock:
                torch.cuda.empty_cache()
            half = len(rgbs) // 2
            return self._read_together(rgbs[:half]) + self._read_together(rgbs[half:])
        return [_read_boxes(result, *chunk.shape[1:3]) for result in results]

    def _read_chunk(self, chunk: np.ndarray) -> list[list]:
        """readtext_batched's result for `chunk` (frames of one shape); the caller holds the
        lock."""
        internals = self._internals
        if internals is not None:
            try:
                results = _read_frames(self._reader, internals, chunk, self._batch)
            except (AttributeError, TypeError, ValueError) as exc:
                if self._internals_proven:
                    raise
                self._internals = None
                _log_fallback(exc)
            else:
                self._internals_proven = True
                return results
        return self._reader.readtext_batched(chunk, batch_size=self._batch, **_THRESHOLDS)


def _log_fallback(exc: BaseException) -> None:
    # Once per engine: a fallback is for good (self._internals = None).
    log.warning(
        "easyocr_batched_recognizer_unavailable",
        fallback="readtext_batched",
        **safe_error(exc),
    )


def _read_frames(
    reader: Any, internals: _Internals, chunk: np.ndarray, batch_size: int
) -> list[list]:
    """What `reader.readtext_batched(chunk, batch_size=batch_size, **_THRESHOLDS)` returns,
    box for box, with the text crops of all frames recognized together.

    readtext_batched detects all frames in one call, then runs Reader.recognize frame by frame:
    one get_text call per frame (on CUDA, batch_size > 1) or per box (on the CPU or with
    batch_size 1), each padding its crops to the widest of its own call (get_text's imgW: a
    crop's reading depends on it). Here each crop keeps the width its own call would have
    had, and the crops of all frames that share a width go through one get_text call: every
    crop gets the same input tensor as before. get_text's second, contrast-adjusted round
    decides crop by crop, so it too is unchanged by the grouping."""
    img, grey = internals.reformat_input_batched(chunk)
    horizontal_agg, free_agg = reader.detect(img, reformat=False, **_THRESHOLDS)
    greys = [grey] if grey.ndim == 2 else list(grey)
    box_by_box = batch_size == 1 or reader.device == "cpu"
    # width -> (frame, place in the frame's result, (box, crop)), in reading order
    crops: dict[int, list[tuple[int, int, Any]]] = {}
    counts = []
    for frame, (frame_grey, horizontal, free) in enumerate(
        zip(greys, horizontal_agg, free_agg, strict=True)
    ):
        if box_by_box:  # Reader.recognize: horizontal boxes first, then free ones
            calls = [([box], []) for box in horizontal] + [([], [box]) for box in free]
        else:
            calls = [(horizontal, free)]
        place = 0
        for call_horizontal, call_free in calls:
            image_list, max_width = internals.get_image_list(
                call_horizontal, call_free, frame_grey, model_height=internals.imgH
            )
            for item in image_list:
                crops.setdefault(int(max_width), []).append((frame, place, item))
                place += 1
        counts.append(place)
    ignore_char = "".join(set(reader.character) - set(reader.lang_char))
    results: list[list[Any]] = [[None] * count for count in counts]
    for width, group in crops.items():
        read = internals.get_text(
            reader.character,
            internals.imgH,
            width,
            reader.recognizer,
            reader.converter,
            [item for _, _, item in group],
            ignore_char,
            _DECODER,
            _BEAM_WIDTH,
            batch_size,
            _CONTRAST_THS,
            _ADJUST_CONTRAST,
            _FILTER_THS,
            0,
            reader.device,
        )
        if len(read) != len(group):
            raise TypeError(f"get_text returned {len(read)} results for {len(group)} crops")
        for (frame, place, _), one in zip(group, read, strict=True):
            results[frame][place] = one
    return results


def _read_boxes(result: list, height: int, width: int) -> list[TextBox]:
    boxes = []
    for points, text, score in result:
        box = box_from_points(points, height, width)
        if box is not None:
            boxes.append(TextBox(box.x, box.y, box.w, box.h, str(text), float(score)))
    return boxes
