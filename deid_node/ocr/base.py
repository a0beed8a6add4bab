"""The OCR engine protocol, the box type every engine returns, and box geometry helpers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TextBox:
    """An axis-aligned text box in image pixel coordinates; `text` is None after detection only."""

    x: int
    y: int
    w: int
    h: int
    text: str | None = None
    score: float = 1.0

    def shifted(self, dx: int, dy: int) -> TextBox:
        return TextBox(self.x + dx, self.y + dy, self.w, self.h, self.text, self.score)

    def scaled(self, factor: float) -> TextBox:
        """The box in a frame `factor` times larger; rounds outwards so text stays covered."""
        x0, y0 = int(np.floor(self.x * factor)), int(np.floor(self.y * factor))
        x1 = int(np.ceil((self.x + self.w) * factor))
        y1 = int(np.ceil((self.y + self.h) * factor))
        return TextBox(x0, y0, x1 - x0, y1 - y0, self.text, self.score)

    def intersects(self, other: TextBox) -> bool:
        return (
            self.x < other.x + other.w
            and other.x < self.x + self.w
            and self.y < other.y + other.h
            and other.y < self.y + self.h
        )


class OcrEngine(Protocol):
    """An OCR engine. One that scales its input to a size of its own (RapidOCR upscales small
    frames) sets `crop_aware = True` and takes `frame_shape=(height, width)` in detect and
    recognize: `image` is a crop of a frame that large, scaled as that frame would be, so text
    in a crop is read as in the whole frame (recognize_in_frame)."""

    name: str

    def detect(self, image: np.ndarray) -> list[TextBox]:
        """Text boxes in a uint8 HxW or HxWx3 (RGB) image; `text` may be None."""
        ...

    def recognize(self, image: np.ndarray) -> list[TextBox]:
        """Text boxes with their text read."""
        ...


def recognize_in_frame(
    engine: OcrEngine, image: np.ndarray, frame_shape: tuple[int, int]
) -> list[TextBox]:
    """`engine.recognize` of `image`, a crop of a frame of `frame_shape` where the engine
    scales crops as their frame (`crop_aware`); other engines see the crop as it is."""
    if getattr(engine, "crop_aware", False):
        return engine.recognize(image, frame_shape=frame_shape)  # type: ignore[call-arg]
    return engine.recognize(image)


def merge_overlapping(
    rects: Sequence[tuple[int, int, int, int]],
) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) rectangles with every overlapping pair replaced by their bounding
    rectangle, until none overlap: each pixel is then in at most one of them."""
    out = list(rects)
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    out[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out


def box_from_points(points: Iterable[Sequence[float]], height: int, width: int) -> TextBox | None:
    """The bounding box of a quadrilateral, clipped to the image; None if nothing is left."""
    pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    x0 = max(0, int(np.floor(pts[:, 0].min())))
    y0 = max(0, int(np.floor(pts[:, 1].min())))
    x1 = min(width, int(np.ceil(pts[:, 0].max())))
    y1 = min(height, int(np.ceil(pts[:, 1].max())))
    if x1 <= x0 or y1 <= y0:
        return None
    return TextBox(x0, y0, x1 - x0, y1 - y0)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A contiguous uint8 HxWx3 copy-or-view of a grey or RGB image, as both engines want."""
    if image.dtype != np.uint8:
        raise TypeError(f"OCR input must be uint8, not {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"OCR input must be HxW or HxWx3, not shape {image.shape}")
    return np.ascontiguousarray(image)
