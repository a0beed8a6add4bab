"""RapidOCR (PaddleOCR models on onnxruntime): DB text detection + CRNN recognition, CPU."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from deid_node.ocr.base import TextBox, as_rgb, box_from_points


class RapidOcrEngine:
    name = "rapidocr"

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR  # lazy: onnxruntime loads only when OCR runs

        # Lower box/score thresholds than the defaults: a missed identifier costs more than
        # a few blanked pixels of clinical overlay.
        self._ocr = RapidOCR(det_box_thresh=0.4, det_unclip_ratio=1.8, text_score=0.3)
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[TextBox]:
        result = self._run(image, use_rec=False)
        height, width = image.shape[:2]
        return [b for b in (box_from_points(p, height, width) for p in result) if b is not None]

    def recognize(self, image: np.ndarray) -> list[TextBox]:
        result = self._run(image, use_rec=True)
        height, width = image.shape[:2]
        boxes = []
        for points, text, score in result:
            box = box_from_points(points, height, width)
            if box is not None:
                boxes.append(TextBox(box.x, box.y, box.w, box.h, str(text), float(score)))
        return boxes

    def _run(self, image: np.ndarray, *, use_rec: bool) -> list[Any]:
        bgr = as_rgb(image)[:, :, ::-1].copy()  # RapidOCR follows OpenCV: BGR
        with self._lock:
            result, _ = self._ocr(bgr, use_det=True, use_cls=False, use_rec=use_rec)
        return list(result or [])
