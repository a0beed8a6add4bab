"""EasyOCR (CRAFT detection + CRNN recognition on torch, CPU or CUDA) from the offline English
models; the `easyocr` extra."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from deid_node.ocr.base import TextBox, as_rgb, box_from_points

# Frames per detector batch on CUDA: 30 800x600 frames in one batch peaked at 14.5 GB of GPU
# memory on an H100 (DEVELOPERS.md, 2026-11-27); 8 keep one worker near 4 GB.
GPU_BATCH_FRAMES = 8
# Text crops per recognizer batch on CUDA (EasyOCR's default of 1 suits the CPU).
GPU_RECOGNIZER_BATCH = 16
_THRESHOLDS: dict[str, Any] = {"text_threshold": 0.6, "low_text": 0.3}


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
        """One readtext_batched call. Out of GPU memory (a smaller card, other workers on it, a
        larger frame), the frames are read in halves, down to one at a time: the file is
        read more slowly, not failed (a failed file quarantines its whole series). A single
        frame that does not fit fails as before."""
        import torch

        chunk = np.stack(rgbs)
        try:
            with self._lock:
                results = self._reader.readtext_batched(
                    chunk, batch_size=self._batch, **_THRESHOLDS
                )
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


def _read_boxes(result: list, height: int, width: int) -> list[TextBox]:
    boxes = []
    for points, text, score in result:
        box = box_from_points(points, height, width)
        if box is not None:
            boxes.append(TextBox(box.x, box.y, box.w, box.h, str(text), float(score)))
    return boxes
