"""EasyOCR (CRAFT detection + CRNN recognition on torch, CPU) from the offline English models."""

from __future__ import annotations

import threading

import numpy as np

from deid_node.ocr.base import TextBox, as_rgb, box_from_points


class EasyOcrEngine:
    name = "easyocr"

    def __init__(self) -> None:
        import easyocr  # lazy: pulls in torch
        import easyocr_en_models

        self._reader = easyocr.Reader(
            ["en"],
            gpu=False,
            model_storage_directory=easyocr_en_models.model_dir(),
            download_enabled=False,
            verbose=False,
        )
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[TextBox]:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        with self._lock:
            horizontal, free = self._reader.detect(rgb, text_threshold=0.6, low_text=0.3)
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
        height, width = rgb.shape[:2]
        with self._lock:
            result = self._reader.readtext(rgb, text_threshold=0.6, low_text=0.3)
        boxes = []
        for points, text, score in result:
            box = box_from_points(points, height, width)
            if box is not None:
                boxes.append(TextBox(box.x, box.y, box.w, box.h, str(text), float(score)))
        return boxes
