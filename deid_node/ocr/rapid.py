"""RapidOCR (PaddleOCR models on onnxruntime): DB text detection + CRNN recognition, CPU."""

from __future__ import annotations

import threading

import cv2
import numpy as np

from deid_node.ocr.base import TextBox, as_rgb, box_from_points, merge_overlapping

# The detector sees the image scaled so its short side is this long (capped by the long side):
# at RapidOCR's default of 736, low-contrast 8-16 px text on noisy backgrounds was found only
# in part (docs/benchmarks-pixels.md). Scaling is ours, not RapidOCR's, so a wide image is not
# blown up to a 1200 px short side without bound.
_DETECT_SHORT_SIDE = 1200
_DETECT_LONG_SIDE_MAX = 2000


class RapidOcrEngine:
    name = "rapidocr"
    crop_aware = True  # detect/recognize take frame_shape (ocr.base.OcrEngine)

    def __init__(self, *, use_cuda: bool = False) -> None:
        from rapidocr_onnxruntime import RapidOCR  # lazy: onnxruntime loads only when OCR runs

        # Lower box/score thresholds and looser boxes than the defaults: a missed identifier
        # costs more than a few blanked pixels of clinical overlay. det_limit_side_len 32 turns
        # RapidOCR's own rescaling off (only rounding to multiples of 32 remains).
        self._ocr = RapidOCR(
            det_box_thresh=0.3,
            det_unclip_ratio=2.0,
            det_limit_type="min",
            det_limit_side_len=32,
            max_side_len=_DETECT_LONG_SIDE_MAX * 2,
            text_score=0.0,  # every detected box comes back with its score: callers judge
            # ONNX Runtime's CUDA provider (onnxruntime-gpu), chosen by ocr.resolve_device.
            det_use_cuda=use_cuda,
            cls_use_cuda=use_cuda,
            rec_use_cuda=use_cuda,
        )
        # Where the detector really runs: ONNX Runtime falls back to the CPU instead of failing.
        providers = self._ocr.text_det.infer.session.get_providers()
        self.device = "cuda" if providers[:1] == ["CUDAExecutionProvider"] else "cpu"
        self._lock = threading.Lock()

    def detect(
        self, image: np.ndarray, frame_shape: tuple[int, int] | None = None
    ) -> list[TextBox]:
        return [box for box, _, _ in self._run(image, frame_shape, use_rec=False)]

    def recognize(
        self, image: np.ndarray, frame_shape: tuple[int, int] | None = None
    ) -> list[TextBox]:
        return [
            TextBox(box.x, box.y, box.w, box.h, text, score)
            for box, text, score in self._run(image, frame_shape, use_rec=True)
        ]

    def _run(
        self, image: np.ndarray, frame_shape: tuple[int, int] | None, *, use_rec: bool
    ) -> list[tuple[TextBox, str, float]]:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        # A crop is scaled as its frame would be: text keeps the size the detector was tuned
        # for, and a small crop is not blown up to a 1200 px short side.
        factor = _detect_factor(*(frame_shape or (height, width)))
        regions = text_regions(rgb) if factor > 1.0 else None
        if factor != 1.0:
            size = (round(width * factor), round(height * factor))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # RapidOCR follows OpenCV: BGR
        with self._lock:
            if regions is None:
                quads = self._detect(bgr)
            else:
                quads = []
                for x0, y0, x1, y1 in regions:
                    sx0, sy0 = int(x0 * factor), int(y0 * factor)
                    sx1, sy1 = (
                        min(bgr.shape[1], round(x1 * factor)),
                        min(bgr.shape[0], round(y1 * factor)),
                    )
                    quads += [q + (sx0, sy0) for q in self._detect(bgr[sy0:sy1, sx0:sx1])]
            read = self._read(bgr, quads) if use_rec and quads else [(None, 1.0)] * len(quads)
        out = []
        for points, (text, score) in zip(quads, read, strict=True):
            box = box_from_points(points / factor, height, width)
            if box is not None:
                out.append((box, text, score))
        return out

    def _detect(self, bgr: np.ndarray) -> list[np.ndarray]:
        """Text quadrilaterals (4x2, `bgr` pixels) from RapidOCR's detector alone."""
        result, _ = self._ocr(bgr, use_det=True, use_cls=False, use_rec=False)
        return [np.asarray(points, np.float32).reshape(4, 2) for points in result or []]

    def _read(self, bgr: np.ndarray, quads: list[np.ndarray]) -> list[tuple[str, float]]:
        """(text, score) of each quadrilateral, read in one batched recognizer call. The one
        place that uses RapidOCR below its __call__ (get_crop_img_list, text_rec): detection
        runs per text region, recognition once for all (test_ocr covers both)."""
        crops = self._ocr.get_crop_img_list(bgr, [q.astype(np.float32) for q in quads])
        result, _ = self._ocr.text_rec(crops)
        return [(str(text), float(score)) for text, score in result]


# Text regions: detection at the upscaled size (4x the pixels of an 800x600 frame) is the
# cost, and text covers a small part of a frame. Strokes are found by a top-hat (bright) and
# black-hat (dark) 7 px wide on the frame and on a half-size copy (strokes up to ~14 px), after
# a slight blur that keeps 1 px strokes and flattens speckle; strokes closed into lines; lines
# padded so the detector sees each whole with context. Tuned on the generated draws of
# scripts/bench_pixels.py, where they cover every planted string (text 50-80 levels above its
# background: strokes pass _STROKE_CONTRAST with room). When they cover more than
# _REGION_MAX_SHARE of the frame (speckle, a screen of text), the whole frame is detected.
_STROKE_CONTRAST = 20
_REGION_MAX_SHARE = 0.4
_REGION_PAD = 24


def text_regions(rgb: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """(x0, y0, x1, y1) rectangles of `rgb` that may hold text; None: detect everywhere."""
    height, width = rgb.shape[:2]
    strokes = _strokes(rgb)
    half = cv2.resize(rgb, (max(1, width // 2), max(1, height // 2)), interpolation=cv2.INTER_AREA)
    strokes |= cv2.resize(_strokes(half), (width, height), interpolation=cv2.INTER_NEAREST)
    lines = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, np.ones((3, 11), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    x, y, w, h, area = (stats[1:count, i] for i in range(5))
    keep = (area >= 30) & (w >= 12) & (h >= 4) & (w >= 1.5 * h)
    mask = np.zeros((height, width), np.uint8)
    for bx, by, bw, bh in zip(x[keep], y[keep], w[keep], h[keep], strict=True):
        px = 2 * int(bh) + _REGION_PAD
        mask[max(0, by - _REGION_PAD) : by + bh + _REGION_PAD, max(0, bx - px) : bx + bw + px] = 1
    if mask.mean() > _REGION_MAX_SHARE:
        return None
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    # Bounding rectangles of touching regions can overlap: merged, each pixel is detected once.
    rects = merge_overlapping(
        [(int(a), int(b), int(a + c), int(b + d)) for a, b, c, d, _ in stats[1:count]]
    )
    total = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects)
    return None if total > _REGION_MAX_SHARE * height * width else rects


def _strokes(rgb: np.ndarray) -> np.ndarray:
    """1 where a thin bright or dark stroke stands out from its neighbourhood."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (7, 7))
    bright = cv2.GaussianBlur(np.ascontiguousarray(rgb.max(axis=2)), (0, 0), 0.7)
    dark = cv2.GaussianBlur(np.ascontiguousarray(rgb.min(axis=2)), (0, 0), 0.7)
    top = cv2.morphologyEx(bright, cv2.MORPH_TOPHAT, kernel)
    black = cv2.morphologyEx(dark, cv2.MORPH_BLACKHAT, kernel)
    return ((top > _STROKE_CONTRAST) | (black > _STROKE_CONTRAST)).astype(np.uint8)


def _detect_factor(height: int, width: int) -> float:
    """Upscale factor for detection: short side to _DETECT_SHORT_SIDE, long side capped."""
    factor = min(
        _DETECT_SHORT_SIDE / min(height, width), _DETECT_LONG_SIDE_MAX / max(height, width)
    )
    return max(1.0, factor)
