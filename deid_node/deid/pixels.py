"""Burned-in text in pixel data: decode every frame, find text, blank it, write pixels back.

REDACT_NO_TEXT never decodes. Otherwise every frame is decoded (any transfer syntax pydicom
and pylibjpeg read), turned into an 8-bit display image for the OCR engine, and text boxes are
filled with the image's display-black value in stored-value space. Pixels are written back only
when something was blanked: uncompressed, Explicit VR Little Endian when the source was
compressed or big endian, YBR decoded to RGB, lossy history kept truthful, icon removed.
OCR engines (torch, onnxruntime) are imported only when a scan runs.

Fail closed: when a scan is asked for but the image cannot be scanned (float or 1-bit pixel
data, an undecodable or unsupported encoding), PixelError is raised and the instance is
quarantined; it is never passed on as if it had been scanned.

BurnedInAnnotation: after REDACT_ALL_TEXT has scanned every frame and blanked what it found, it
is set to "NO" -- that mode leaves no text the detector can see. When that scan finds nothing
on an image whose header says "YES", the header is left as it is and the reasons say so: the
device knows better than a detector that came up empty. REDACT_SENSITIVE_TEXT leaves it alone,
since clinical text stays burned in by design; REDACT_NO_TEXT leaves it alone too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil

import cv2
import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from deid_node.config import PixelsConfig, RegionTemplate
from deid_node.deid.sensitive import SensitiveTextClassifier
from deid_node.errors import PixelError
from deid_node.modes import DeidentifyRedactTextMode
from deid_node.ocr import OcrEngine, TextBox, get_engine

# Lossy transfer syntaxes and the method name PS3.3 C.7.6.1.1.5 gives each.
_LOSSY_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}
# Frames are diffed against the previous one; changed regions smaller than this share of the
# frame are re-scanned alone, larger ones as a whole frame.
_CROP_MAX_SHARE = 0.5
_CROP_PAD = 24
_CROP_MIN_SIDE = 160
# Detector boxes can stop short of a line's first or last glyph (low contrast, cut by the
# edge); a line's ends are padded by this share of its height, its top and bottom by the margin.
_LINE_END_PAD = 0.75


@dataclass
class PixelOutcome:
    changed: bool  # pixel data modified
    frames: int
    boxes: int
    engine: str | None
    mode: str
    reasons: list[str] = field(default_factory=list)  # categories only, never patient values


@dataclass
class _Decoded:
    frames: np.ndarray  # (N, H, W) or (N, H, W, 3), stored values (palette: indices)
    photometric: str  # of `frames`, after any YBR -> RGB conversion
    source_photometric: str


def redact_pixels(
    ds: Dataset,
    mode: DeidentifyRedactTextMode,
    config: PixelsConfig,
    identifiers: Sequence[str] = (),
) -> PixelOutcome:
    """Find and blank burned-in text in `ds` in place, as `mode` asks; raise PixelError if the
    pixel data cannot be decoded or written back (the instance must then not be forwarded)."""
    mode = DeidentifyRedactTextMode(mode)
    reasons: list[str] = []
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        reasons.append("burned_in_annotation=YES")
    if mode is DeidentifyRedactTextMode.REDACT_NO_TEXT:
        return PixelOutcome(False, _frame_count(ds), 0, None, mode.value, reasons)
    if _has_float_pixels(ds):
        raise PixelError("float pixel data cannot be scanned for burned-in text")
    if "PixelData" not in ds:
        return PixelOutcome(False, 0, 0, None, mode.value, [*reasons, "no_pixel_data"])

    decoded = _decode(ds)
    count = decoded.frames.shape[0]
    template_boxes: list[TextBox] = []
    for template in _matching_templates(ds, config.templates):
        reasons.append(f"template:{template.manufacturer}/{template.model}")
        template_boxes.extend(TextBox(x, y, w, h) for x, y, w, h in template.regions)

    engine = get_engine(config.ocr_engine)
    classifier = (
        SensitiveTextClassifier(identifiers)
        if mode is DeidentifyRedactTextMode.REDACT_SENSITIVE_TEXT
        else None
    )
    display = _DisplayMapper(ds, decoded)
    fill = _fill_value(ds, decoded)
    frame_boxes, scanned = _scan_frames(decoded, display, engine, classifier, config)
    if scanned < count:
        reasons.append(f"frames_reused={count - scanned}")
    if classifier is not None:
        categories = sorted({b.text for boxes in frame_boxes for b in boxes if b.text})
        reasons.extend(f"sensitive:{c}" for c in categories)

    total = 0
    height, width = decoded.frames.shape[1:3]
    for index in range(count):
        regions = [(b, 0, 0) for b in template_boxes]
        regions += [
            (b, max(config.margin_px, ceil(_LINE_END_PAD * b.h)), config.margin_px)
            for b in frame_boxes[index]
        ]
        for box, mx, my in regions:
            x0, y0 = max(0, box.x - mx), max(0, box.y - my)
            x1, y1 = min(width, box.x + box.w + mx), min(height, box.y + box.h + my)
            if x1 > x0 and y1 > y0:
                decoded.frames[index, y0:y1, x0:x1] = fill
        total += len(regions)
    all_text = mode is DeidentifyRedactTextMode.REDACT_ALL_TEXT
    if total == 0:
        if all_text and "burned_in_annotation=YES" in reasons:
            reasons.append("no_text_found_despite_burned_in_annotation=YES")
        return PixelOutcome(False, count, 0, engine.name, mode.value, reasons)
    _write_back(ds, decoded)
    if all_text:
        ds.BurnedInAnnotation = "NO"
    return PixelOutcome(True, count, total, engine.name, mode.value, reasons)


def _scan_frames(
    decoded: _Decoded,
    display: _DisplayMapper,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    config: PixelsConfig,
) -> tuple[list[list[TextBox]], int]:
    """Boxes to blank per frame (text replaced by the sensitive category) and frames OCR'd.

    A frame equal to the previous one reuses its boxes; a frame that differs only in a region
    (US cine: the sector moves, the overlay stays) is re-scanned only in that region.
    """
    frames = decoded.frames
    height, width = frames.shape[1:3]
    result: list[list[TextBox]] = []
    previous: np.ndarray | None = None
    scanned = 0
    for index in range(frames.shape[0]):
        frame = frames[index]
        region = None if previous is None else _changed_region(previous, frame)
        if previous is not None and region is None:
            result.append(result[-1])
            previous = frame
            continue
        scanned += 1
        if region is None:
            boxes = _find(display.image(index), engine, classifier, config.max_detect_side)
        else:
            x0, y0, x1, y1 = _expand_over_boxes(region, result[-1], height, width)
            if (x1 - x0) * (y1 - y0) > _CROP_MAX_SHARE * height * width:
                boxes = _find(display.image(index), engine, classifier, config.max_detect_side)
            else:
                crop = display.image(index)[y0:y1, x0:x1]
                found = _find(crop, engine, classifier, config.max_detect_side)
                inside = TextBox(x0, y0, x1 - x0, y1 - y0)
                kept = [b for b in result[-1] if not b.intersects(inside)]
                boxes = kept + [b.shifted(x0, y0) for b in found]
        result.append(boxes)
        previous = frame
    return result, scanned


def _find(
    image: np.ndarray,
    engine: OcrEngine,
    classifier: SensitiveTextClassifier | None,
    max_side: int,
) -> list[TextBox]:
    """Boxes in `image` coordinates; with a classifier only the identifying ones, text=category."""
    height, width = image.shape[:2]
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if classifier is None:
        boxes = engine.detect(image)
    else:
        boxes = []
        for box in engine.recognize(image):
            category = classifier.reason(box.text)
            if category is not None:
                boxes.append(TextBox(box.x, box.y, box.w, box.h, category, box.score))
    if scale != 1.0:
        boxes = [b.scaled(1 / scale) for b in boxes]
    return boxes


def _changed_region(previous: np.ndarray, frame: np.ndarray) -> tuple[int, int, int, int] | None:
    diff = previous != frame
    if diff.ndim == 3:
        diff = diff.any(axis=2)
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(diff.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _expand_over_boxes(
    region: tuple[int, int, int, int], boxes: list[TextBox], height: int, width: int
) -> tuple[int, int, int, int]:
    """Pad the changed region for context and grow it over any box it cuts, so a text line is
    always detected whole or kept whole."""
    x0, y0, x1, y1 = region
    x0, y0 = max(0, x0 - _CROP_PAD), max(0, y0 - _CROP_PAD)
    x1, y1 = min(width, x1 + _CROP_PAD), min(height, y1 + _CROP_PAD)
    if x1 - x0 < _CROP_MIN_SIDE:
        grow = (_CROP_MIN_SIDE - (x1 - x0) + 1) // 2
        x0, x1 = max(0, x0 - grow), min(width, x1 + grow)
    if y1 - y0 < _CROP_MIN_SIDE:
        grow = (_CROP_MIN_SIDE - (y1 - y0) + 1) // 2
        y0, y1 = max(0, y0 - grow), min(height, y1 + grow)
    grown = True
    while grown:
        grown = False
        inside = TextBox(x0, y0, x1 - x0, y1 - y0)
        for b in boxes:
            if b.intersects(inside) and (b.x < x0 or b.y < y0 or b.x + b.w > x1 or b.y + b.h > y1):
                x0, y0 = min(x0, b.x), min(y0, b.y)
                x1, y1 = max(x1, b.x + b.w), max(y1, b.y + b.h)
                grown = True
    return x0, y0, x1, y1


def _decode(ds: Dataset) -> _Decoded:
    meta = getattr(ds, "file_meta", None)
    syntax = UID(
        meta.get("TransferSyntaxUID", ExplicitVRLittleEndian) if meta else ExplicitVRLittleEndian
    )
    source_pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if int(ds.get("BitsAllocated", 0)) not in (8, 16, 32):
        raise PixelError(f"unsupported BitsAllocated {ds.get('BitsAllocated')} for text redaction")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise PixelError(f"no pixel data decoder for transfer syntax {syntax}") from None
    if not decoder.is_available:
        raise PixelError(f"decoder for transfer syntax {syntax} is missing its plugins")
    try:
        array, info = decoder.as_array(ds, as_rgb=True)
    except Exception as exc:  # a library's message may quote values: keep only its type
        raise PixelError(
            f"cannot decode pixel data ({syntax.name}): {type(exc).__name__}"
        ) from None
    photometric = str(info.get("photometric_interpretation", source_pi)).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples not in (1, 3):
        raise PixelError(f"unsupported SamplesPerPixel {samples} for text redaction")
    single_ndim = 2 if samples == 1 else 3
    if array.ndim == single_ndim:
        array = array[np.newaxis]
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return _Decoded(array, photometric, source_pi)


class _DisplayMapper:
    """Stored values -> the 8-bit image a viewer would show, with one mapping for all frames so
    equal stored regions stay equal after mapping."""

    def __init__(self, ds: Dataset, decoded: _Decoded) -> None:
        self._frames = decoded.frames
        self._pi = decoded.photometric
        self._lut: np.ndarray | None = None
        self._low, self._high = 0.0, 255.0
        self._slope = float(ds.get("RescaleSlope", 1) or 1)
        self._intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if self._pi == "PALETTE COLOR":
            self._palette_ds = ds
        elif self._pi in ("MONOCHROME1", "MONOCHROME2"):
            window = _first_window(ds)
            if window is not None:
                center, width = window
                self._low, self._high = (
                    center - 0.5 - (width - 1) / 2,
                    center - 0.5 + (width - 1) / 2,
                )
            else:
                # Rescale is linear: map the stored extremes, not a float copy of every frame.
                ends = sorted(float(v) * self._slope + self._intercept
                              for v in (self._frames.min(), self._frames.max()))  # fmt: skip
                self._low, self._high = ends[0], ends[1]
        elif self._frames.dtype != np.uint8:
            self._low, self._high = float(self._frames.min()), float(self._frames.max())

    def image(self, index: int) -> np.ndarray:
        frame = self._frames[index]
        if self._pi == "PALETTE COLOR":
            rgb = apply_color_lut(frame, self._palette_ds)
            top = float(rgb.max()) or 1.0
            return np.ascontiguousarray(
                rgb if rgb.dtype == np.uint8 else (rgb * (255.0 / top)).astype(np.uint8)
            )
        if self._pi in ("MONOCHROME1", "MONOCHROME2"):
            values = frame.astype(np.float32) * self._slope + self._intercept
            image = _stretch(values, self._low, self._high)
            return 255 - image if self._pi == "MONOCHROME1" else image
        if frame.dtype == np.uint8:
            return frame
        return _stretch(frame.astype(np.float32), self._low, self._high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) * (255.0 / span)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width >= 1 else None


def _is_multi(value: object) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _fill_value(ds: Dataset, decoded: _Decoded) -> np.ndarray | int:
    """Display-black in stored values: min for MONOCHROME2, max for MONOCHROME1 (inverted),
    per-channel min for colour, the darkest palette entry in use for PALETTE COLOR."""
    frames = decoded.frames
    if decoded.photometric == "MONOCHROME1":
        return frames.max()
    if decoded.photometric == "PALETTE COLOR":
        used = np.unique(frames)
        rgb = apply_color_lut(used, ds).astype(np.float64)
        luminance = rgb @ np.array([0.299, 0.587, 0.114])
        return used[int(np.argmin(luminance))]
    if frames.ndim == 4:
        return frames.min(axis=(0, 1, 2))
    return frames.min()


def _write_back(ds: Dataset, decoded: _Decoded) -> None:
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    meta = ds.file_meta
    syntax = UID(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    compressed_size = _encapsulated_size(ds) if syntax.is_compressed else 0
    lossy_method = _lossy_method(ds, syntax)
    multi = "NumberOfFrames" in ds
    array = decoded.frames if multi else decoded.frames[0]
    bits_stored = int(ds.get("BitsStored", array.dtype.itemsize * 8))
    try:
        ds.set_pixel_data(array, decoded.photometric, bits_stored, generate_instance_uid=False)
    except ValueError as exc:
        raise PixelError(f"cannot write redacted pixel data back: {type(exc).__name__}") from None
    if syntax == ExplicitVRBigEndian:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if lossy_method:
        _record_lossy(ds, lossy_method, array.nbytes / compressed_size if compressed_size else None)
    if "IconImageSequence" in ds:
        del ds.IconImageSequence  # a thumbnail of the unredacted pixels


def _lossy_method(ds: Dataset, syntax: UID) -> str | None:
    method = _LOSSY_METHODS.get(syntax)
    if syntax == JPEG2000 and _j2k_is_reversible(ds):
        return None
    return method


def _j2k_is_reversible(ds: Dataset) -> bool:
    """JPEG 2000 (.4.91) may be lossless: the COD marker's transform byte says 5-3 reversible."""
    from pydicom.encaps import generate_fragments

    try:
        first = next(generate_fragments(ds.PixelData))
    except (StopIteration, ValueError):
        return False
    cod = first.find(b"\xff\x52")
    return cod >= 0 and len(first) > cod + 13 and first[cod + 13] == 1


def _record_lossy(ds: Dataset, method: str, ratio: float | None) -> None:
    ds.LossyImageCompression = "01"
    methods = list(_as_list(ds.get("LossyImageCompressionMethod")))
    ratios = list(_as_list(ds.get("LossyImageCompressionRatio")))
    if method not in methods or len(ratios) != len(methods):
        methods.append(method)
        if ratio is not None and len(ratios) == len(methods) - 1:
            ratios.append(f"{ratio:.2f}"[:16])
        ds.LossyImageCompressionMethod = methods
        if ratios and len(ratios) == len(methods):
            ds.LossyImageCompressionRatio = ratios


def _as_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    return [str(v) for v in value] if _is_multi(value) else [str(value)]


def _encapsulated_size(ds: Dataset) -> int:
    return len(ds.PixelData)


def _matching_templates(ds: Dataset, templates: Sequence[RegionTemplate]) -> list[RegionTemplate]:
    manufacturer = str(ds.get("Manufacturer", "")).strip().upper()
    model = str(ds.get("ManufacturerModelName", "")).strip().upper()
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return [
        t
        for t in templates
        if (not t.manufacturer or t.manufacturer.strip().upper() == manufacturer)
        and (not t.model or t.model.strip().upper() == model)
        and (t.rows is None or t.rows == rows)
        and (t.columns is None or t.columns == columns)
    ]


def _frame_count(ds: Dataset) -> int:
    if "PixelData" not in ds:
        return 0
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _has_float_pixels(ds: Dataset) -> bool:
    return "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
