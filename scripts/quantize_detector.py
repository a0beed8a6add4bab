"""Make deid_node/ocr/models/ch_PP-OCRv4_det_int8.onnx: RapidOCR's PP-OCRv4 text detector with
int8 weights and activations (ONNX Runtime static quantisation, QDQ, per-channel weights),
calibrated on generated text images scaled as the node scales them for detection.

Run once, by hand; the result is committed. Needs the `onnx` package, which the node itself
does not (`pip install onnx`):

    .venv/bin/python scripts/quantize_detector.py [--out PATH]

Calibration uses seeds the benchmark does not (ordinary 700-705, hard 1000-1005), so
scripts/bench_pixels.py measures recall on draws the quantiser never saw. The model is
converted to opset 17 first: the per-channel DequantizeLinear needs opset >= 13 (the shipped
model is opset 12). Licence: the PaddleOCR model is Apache-2.0, like this project.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from textimages import hard_text_image, text_image  # noqa: E402

from deid_node.ocr.rapid import _INT8_DETECTOR, _det_input, _detect_factor, _round32  # noqa: E402


def calibration_inputs() -> list[np.ndarray]:
    images = []
    for seed in range(6):
        image, _ = text_image(700 + seed, 600, 800, colour=seed % 2 == 0, min_scale=0.4)
        images.append(image)
    for seed in range(6):
        image, _, _ = hard_text_image(1000 + seed)
        images.append(image)
    out = []
    for image in images:
        rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        height, width = rgb.shape[:2]
        factor = _detect_factor(height, width)
        size = (_round32(width * factor), _round32(height * factor))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)
        out.append(_det_input(np.ascontiguousarray(rgb[:, :, ::-1])))
    return out


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from rapidocr_onnxruntime import RapidOCR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_INT8_DETECTOR)
    args = parser.parse_args()
    source = RapidOCR().text_det.infer.session._model_path
    name = ort.InferenceSession(source).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._inputs = iter([{name: x} for x in calibration_inputs()])

        def get_next(self):
            return next(self._inputs, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, pre17 = Path(tmp) / "pre.onnx", Path(tmp) / "pre17.onnx"
        quant_pre_process(source, str(pre), skip_symbolic_shape=True)
        onnx.save(version_converter.convert_version(onnx.load(str(pre)), 17), str(pre17))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(
            str(pre17),
            str(args.out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    print(args.out)


if __name__ == "__main__":
    main()
