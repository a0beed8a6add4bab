"""OCR engines behind one protocol: `get_engine("rapidocr" | "easyocr")`, one load per process.

Engine modules import their heavy dependencies (onnxruntime, torch) only when first built.
"""

from __future__ import annotations

import threading

from deid_node.errors import ConfigError
from deid_node.ocr.base import OcrEngine, TextBox

__all__ = ["ENGINES", "OcrEngine", "TextBox", "get_engine"]

ENGINES = ("rapidocr", "easyocr")

_engines: dict[str, OcrEngine] = {}
_lock = threading.Lock()


def get_engine(name: str) -> OcrEngine:
    """The process-wide engine called `name`, built (models loaded) on first use."""
    with _lock:
        engine = _engines.get(name)
        if engine is None:
            engine = _build(name)
            _engines[name] = engine
        return engine


def _build(name: str) -> OcrEngine:
    if name == "rapidocr":
        from deid_node.ocr.rapid import RapidOcrEngine

        return RapidOcrEngine()
    if name == "easyocr":
        from deid_node.ocr.easy import EasyOcrEngine

        return EasyOcrEngine()
    raise ConfigError(
        f"pixels.ocr_engine: unknown OCR engine {name!r}; known: {', '.join(ENGINES)}"
    )
