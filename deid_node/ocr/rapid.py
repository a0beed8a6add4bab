"""RapidOCR (PaddleOCR models on onnxruntime): DB text detection + CRNN recognition, CPU."""

from __future__ import annotations

import os
import threading

import cv2
import numpy as np

from deid_node.ocr.base import TextBox, as_rgb, box_from_points

# The detector sees the image scaled so its short side is this long (capped by the long side):
# at RapidOCR's default of 736, low-contrast 8-16 px text on noisy backgrounds was found only
# in part (docs/benchmarks-pixels.md). Scaling is ours, not RapidOCR's, so a wide image is not
# blown up to a 1200 px short side without bound.
_DETECT_SHORT_SIDE = 1200
_DETECT_LONG_SIDE_MAX = 2000
# DB's input is normalised as RapidOCR does, in float32 (RapidOCR's own step runs in float64).
_DET_SCALE = np.float32(2.0 / 255.0)


class RapidOcrEngine:
    name = "rapidocr"
    crop_aware = True  # detect/recognize take frame_shape (ocr.base.OcrEngine)

    def __init__(
        self,
        *,
        use_cuda: bool = False,
        tuned: bool = True,
        rec_batch_num: int = 6,
    ) -> None:
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
        self._tuned = tuned and self.device == "cpu"
        if self._tuned:
            try:
                _tune_cpu_sessions(self._ocr)
            except AttributeError:
                # _tune_cpu_sessions reaches into RapidOCR's objects (1.3-1.4): another
                # release keeps its own sessions and preprocessing, slower but the same reading.
                self._tuned = False
        self._ocr.text_rec.rec_batch_num = rec_batch_num
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
    ) -> list[tuple[TextBox, str | None, float]]:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        # A crop is scaled as its frame would be: text keeps the size the detector was tuned
        # for, and a small crop is not blown up to a 1200 px short side. The whole (upscaled)
        # frame is detected: detecting only on text-bearing regions took 0.37x the time but
        # lost 1-3 of 320 faint hard-draw lines that the whole frame kept (DB's output at a
        # crop's edge differs; docs/benchmarks-pixels.md).
        factor = _detect_factor(*(frame_shape or (height, width)))
        if self._tuned:
            # Straight to the detector's multiple-of-32 size: one resize, not two.
            size = (_round32(width * factor), _round32(height * factor))
        else:
            size = (round(width * factor), round(height * factor))
        if size != (width, height):
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)
        scale = np.array([size[0] / width, size[1] / height])
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # RapidOCR follows OpenCV: BGR
        with self._lock:
            result, _ = self._ocr(bgr, use_det=True, use_cls=False, use_rec=use_rec)
        out = []
        for item in result or []:
            points, text, score = (item, None, 1.0) if not use_rec else item
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) / scale
            box = box_from_points(pts, height, width)
            if box is not None:
                out.append((box, None if text is None else str(text), float(score)))
        return out


def _detect_factor(height: int, width: int) -> float:
    """Upscale factor for detection: short side to _DETECT_SHORT_SIDE, long side capped."""
    factor = min(
        _DETECT_SHORT_SIDE / min(height, width), _DETECT_LONG_SIDE_MAX / max(height, width)
    )
    return max(1.0, factor)


def _round32(value: float) -> int:
    return max(32, int(round(value / 32) * 32))


def _tune_cpu_sessions(ocr) -> None:
    """Rebuild RapidOCR's detector and recognizer sessions for a CPU shared with other work:
    as many intra-op threads as this process may use, no spinning between ops (RapidOCR's
    default spins, burning a core while waiting), the memory arena on (RapidOCR turns it off:
    every run re-allocates the 1216x1600 feature maps). Detection's input is normalised in
    float32 by our own step. An int8 detector (static QDQ quantisation) took about half the
    detector's CPU time but lost faint hard-draw strings: not used (docs/benchmarks-pixels.md)."""
    import onnxruntime as ort

    threads = max(1, len(os.sched_getaffinity(0)))

    def session(model: str):
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = True
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    det, rec = ocr.text_det, ocr.text_rec
    det.infer.session = session(det.infer.session._model_path)
    rec.session.session = session(rec.session.session._model_path)
    det.get_preprocess = lambda _max_wh: _det_input


def _det_input(bgr: np.ndarray) -> np.ndarray:
    """DB's input, (x / 255 - 0.5) / 0.5 as CHW float32, at multiples of 32 (RapidOCR pads a
    very flat crop, so its size may be off: resized as RapidOCR would)."""
    height, width = bgr.shape[:2]
    if height % 32 or width % 32:
        bgr = cv2.resize(bgr, (_round32(width), _round32(height)))
    x = bgr.astype(np.float32)
    x *= _DET_SCALE
    x -= np.float32(1.0)
    return x.transpose(2, 0, 1)[np.newaxis].copy()
