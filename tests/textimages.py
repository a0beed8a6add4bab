"""Images with known burned-in text for pixel redaction tests and benchmarks.

Text is drawn with cv2.putText on noisy, anatomy-like backgrounds; every planted string comes
back with its exact bounding box, so tests can check what was blanked and what was not.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Identifying strings (never clinical words), and clinical overlay that REDACT_SENSITIVE_TEXT keeps.
PHI_TEXTS = (
    "ZYXWORTHA^QUILLIAM",
    "PIDQX778812",
    "DOB 1943-11-07",
    "ACC ACCQX99103",
    "QUARVINGTON HOSP",
    "12/03/2024 10:15:30",
    "Drovak Elspeth",
    "Montague Zyxwortha",
)
CLINICAL_TEXTS = ("5.0 MHz", "DEPTH 16cm", "GAIN 50%", "-30dB", "L", "R")
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
)
COLOURS = ((255, 255, 255), (255, 255, 0), (0, 255, 0), (0, 255, 255), (190, 190, 190))


@dataclass(frozen=True)
class Planted:
    text: str
    x: int
    y: int
    w: int
    h: int
    clinical: bool = False

    def mask(
        self, shape: tuple[int, int], margin: int = 0, margin_x: int | None = None
    ) -> np.ndarray:
        """The box grown by `margin` (and by `margin_x` left and right, if given)."""
        mx = margin if margin_x is None else margin_x
        out = np.zeros(shape, bool)
        out[
            max(0, self.y - margin) : self.y + self.h + margin,
            max(0, self.x - mx) : self.x + self.w + mx,
        ] = True
        return out


def background(
    rng: np.random.Generator, height: int, width: int, inverted: bool = False
) -> np.ndarray:
    """A grey, anatomy-like background: smooth blobs, an ultrasound-like sector, speckle."""
    low = cv2.resize(rng.uniform(0, 90, (height // 40 + 2, width // 40 + 2)), (width, height))
    image = low + rng.normal(0, 12, (height, width))
    centre = (width // 2, height // 8)
    cv2.ellipse(image, centre, (width // 3, height * 3 // 4), 90, -35, 35, 40, -1)
    image = np.clip(image, 0, 140).astype(np.uint8)
    return 255 - image if inverted else image


def draw_text(
    image: np.ndarray,
    text: str,
    origin: tuple[int, int],
    *,
    font: int = cv2.FONT_HERSHEY_SIMPLEX,
    scale: float = 0.7,
    colour: tuple[int, int, int] = (255, 255, 255),
    thickness: int = 2,
    clinical: bool = False,
) -> Planted:
    """Draw `text` with its baseline-left corner at `origin`; return its pixel bounding box."""
    (w, h), baseline = cv2.getTextSize(text, font, scale, thickness)
    x, y = origin
    value = colour if image.ndim == 3 else int(np.mean(colour))
    cv2.putText(image, text, (x, y), font, scale, value, thickness, cv2.LINE_AA)
    pad = thickness
    return Planted(text, x - pad, y - h - pad, w + 2 * pad, h + baseline + 2 * pad, clinical)


def text_image(
    seed: int,
    height: int = 600,
    width: int = 800,
    *,
    colour: bool = True,
    inverted: bool = False,
    texts: tuple[str, ...] | None = None,
    clinical: bool = True,
    min_scale: float = 0.5,
    max_scale: float = 0.9,
) -> tuple[np.ndarray, list[Planted]]:
    """One image with PHI strings in the corners and edges, in varied fonts, sizes, colours."""
    rng = np.random.default_rng(seed)
    grey = background(rng, height, width, inverted)
    image = np.repeat(grey[:, :, None], 3, axis=2) if colour else grey
    chosen = list(texts if texts is not None else rng.choice(PHI_TEXTS, 4, replace=False))
    planted: list[Planted] = []
    # Anchors: four corners, top middle, bottom middle; text lines never overlap.
    anchors = [
        (0.02, 0.07), (0.60, 0.07), (0.02, 0.95), (0.60, 0.95), (0.30, 0.16), (0.30, 0.86),
    ]  # fmt: skip
    for index, text in enumerate(chosen):
        fx, fy = anchors[index % len(anchors)]
        font = FONTS[int(rng.integers(len(FONTS)))]
        scale = float(rng.uniform(min_scale, max_scale)) * (
            1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1
        )
        tone = (20, 20, 20) if inverted else COLOURS[int(rng.integers(len(COLOURS)))]
        thickness = 1 if scale < 0.6 else 2 if scale < 1.5 else 3
        planted.append(
            draw_text(
                image,
                text,
                (int(fx * width), int(fy * height)),
                font=font,
                scale=scale,
                colour=tone,
                thickness=thickness,
            )  # fmt: skip
        )
    if clinical:
        tone = (20, 20, 20) if inverted else (200, 200, 200)
        planted.append(
            draw_text(
                image,
                "5.0 MHz",
                (int(0.80 * width), int(0.50 * height)),
                scale=0.5,
                colour=tone,
                thickness=1,
                clinical=True,
            )  # fmt: skip
        )
    return image, planted


def blank_image(seed: int, height: int = 600, width: int = 800) -> np.ndarray:
    """A background with no text at all."""
    return background(np.random.default_rng(seed), height, width)


def to_stored(image8: np.ndarray, bits: int = 8, monochrome1: bool = False) -> np.ndarray:
    """Grey 8-bit display image -> stored values with `bits` significant bits (MONOCHROME1
    stores the inverse)."""
    grey = image8 if image8.ndim == 2 else image8.mean(axis=2).astype(np.uint8)
    if monochrome1:
        grey = 255 - grey
    if bits == 8:
        return grey.astype(np.uint8)
    return (grey.astype(np.uint32) * ((1 << bits) - 1) // 255).astype(np.uint16)


def tesseract_text(image: np.ndarray) -> str:
    """What Tesseract reads in an 8-bit image (sparse text mode)."""
    if shutil.which("tesseract") is None:
        raise RuntimeError("tesseract is not installed")
    if max(image.shape[:2]) > 1200:  # Tesseract on large noisy images takes minutes
        factor = 1200 / max(image.shape[:2])
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.png"
        bgr = image[:, :, ::-1] if image.ndim == 3 else image
        cv2.imwrite(str(path), np.ascontiguousarray(bgr))
        done = subprocess.run(
            ["tesseract", str(path), "-", "--psm", "11"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    return done.stdout


def normalise(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def found_strings(read: str, planted: list[Planted]) -> list[str]:
    """Planted strings (or their long parts) that appear in OCR output `read`."""
    haystack = normalise(read)
    hits = []
    for p in planted:
        parts = [p.text, *p.text.replace("^", " ").split()]
        if any(len(normalise(part)) >= 4 and normalise(part) in haystack for part in parts):
            hits.append(p.text)
    return hits


# Header names for the harder draws, and the ways a device or a person writes them on screen.
HEADER_NAMES = ("Smith^Mary", "Zyxwortha^Quilliam", "O'Brien^Sean", "Nakamura^Keiko")


def name_variants(header_name: str) -> tuple[str, ...]:
    """A PN value as burned-in text: other orders, cases and initials ("Mary Smith",
    "SMITH, MARY", "M. Smith", "smith mary")."""
    family, _, given = header_name.partition("^")
    given = given.split("^")[0]
    return (
        f"{given} {family}",
        f"{family.upper()}, {given.upper()}",
        f"{given[:1]}. {family}",
        f"{family.lower()} {given.lower()}",
        f"{family.upper()}^{given.upper()}",
    )


def hard_text_image(
    seed: int, height: int = 600, width: int = 800, *, blank: bool = False
) -> tuple[np.ndarray, list[Planted], str]:
    """Harder draws than text_image: small (6-14 px) and low-contrast text, the header's own
    name written in another order or case; returns the image, the planted strings and the
    header PatientName the image belongs to. `blank`: the same background, nothing drawn."""
    rng = np.random.default_rng(10_000 + seed)
    header = HEADER_NAMES[seed % len(HEADER_NAMES)]
    variants = name_variants(header)
    grey = background(rng, height, width)
    colour = bool(seed % 2)
    image = np.repeat(grey[:, :, None], 3, axis=2) if colour else grey.copy()
    if blank:
        return image, [], header
    texts = [
        str(rng.choice(variants)),
        str(rng.choice(variants)),
        *rng.choice(PHI_TEXTS, 2, replace=False),
    ]
    anchors = [(0.02, 0.05), (0.55, 0.05), (0.02, 0.96), (0.55, 0.96)]
    planted: list[Planted] = []
    for index, text in enumerate(texts):
        fx, fy = anchors[index]
        font = FONTS[int(rng.integers(len(FONTS)))]
        small = index % 2 == 0
        scale = float(rng.uniform(0.32, 0.45) if small else rng.uniform(0.45, 0.8))
        if font == cv2.FONT_HERSHEY_PLAIN:
            scale *= 1.6
        # Low contrast: text 50-80 grey levels above the local background mean.
        x, y = int(fx * width), int(fy * height)
        local = float(grey[max(0, y - 20) : y + 5, x : x + 120].mean())
        level = int(min(255, local + rng.uniform(50, 80)))
        planted.append(
            draw_text(
                image,
                text,
                (x, y),
                font=font,
                scale=scale,
                colour=(level, level, level),
                thickness=1,
            )  # fmt: skip
        )
    planted.append(
        draw_text(
            image,
            "DEPTH 16cm",
            (int(0.80 * width), int(0.50 * height)),
            scale=0.5,
            colour=(200, 200, 200),
            thickness=1,
            clinical=True,
        )  # fmt: skip
    )
    return image, planted, header


CineKind = str  # "static" | "moving" | "changing"


def strings_missed(
    before: np.ndarray, blank: np.ndarray, after: np.ndarray, planted: list[Planted]
) -> tuple[int, int]:
    """(identifying strings of one RGB frame with under 99% of their ink changed by the
    redaction, identifying strings drawn): `before` the frame as drawn, `blank` the same frame
    with nothing drawn, `after` the frame as redacted. Clinical strings are not counted."""
    changed = (after != before).any(axis=-1)
    ink = (before != blank).any(axis=-1)
    missed = total = 0
    for p in planted:
        own = ink & p.mask(ink.shape)
        if p.clinical or not own.any():
            continue
        total += 1
        missed += int(changed[own].mean() < 0.99)
    return missed, total


def cine_frames(
    seed: int,
    frames: int,
    kind: CineKind = "static",
    height: int = 600,
    width: int = 800,
    *,
    blank: bool = False,
) -> tuple[np.ndarray, list[list[Planted]]]:
    """An ultrasound-like RGB cine: a sector of anatomy-like texture that moves every frame on
    a dark, still border, with identifying text in the corners; (frames, planted per frame).

    static: the same strings in every frame (one inside the moving sector). moving: one string
    slides across the frame, a few pixels per frame. changing: a running clock and a depth label
    that change between frames, and a name that appears only in the last third of the frames.
    blank: the same frames with nothing drawn (planted still says where the text would be).
    """
    rng = np.random.default_rng(5_000 + seed)
    pad = 4 * frames + 64
    side = (height + pad, width + pad)
    blobs = cv2.resize(rng.uniform(0, 150, (side[0] // 24 + 2, side[1] // 24 + 2)), side[::-1])
    texture = np.clip(blobs + rng.normal(0, 18, side), 0, 170).astype(np.uint8)
    still = np.clip(rng.normal(8, 3, (height, width)), 0, 255).astype(np.uint8)
    sector = np.zeros((height, width), np.uint8)
    cv2.ellipse(
        sector, (width // 2, height // 8), (width // 3, height * 3 // 4), 90, -35, 35, 1, -1
    )
    inside = sector.astype(bool)
    names = list(rng.choice(PHI_TEXTS, 4, replace=False))
    out = np.empty((frames, height, width, 3), np.uint8)
    planted: list[list[Planted]] = []
    for index in range(frames):
        dx, dy = 3 * index, int(12 * np.sin(index / 3)) + 16
        grey = still.copy()
        grey[inside] = texture[dy : dy + height, dx : dx + width][inside]
        image = np.repeat(grey[:, :, None], 3, axis=2)
        canvas = image
        if blank:
            image = image.copy()  # drawn on and thrown away: only the boxes are kept
        found = [
            draw_text(image, names[0], (int(0.02 * width), int(0.06 * height)), scale=0.6),
            draw_text(
                image,
                names[1],
                (int(0.62 * width), int(0.06 * height)),
                scale=0.5,
                thickness=1,
                colour=(255, 255, 0),
            ),  # fmt: skip
            draw_text(
                image,
                "5.0 MHz",
                (int(0.82 * width), int(0.5 * height)),
                scale=0.5,
                thickness=1,
                colour=(200, 200, 200),
                clinical=True,
            ),  # fmt: skip
        ]
        if kind == "static":
            found.append(draw_text(image, names[2], (int(0.40 * width), int(0.45 * height)),
                                   scale=0.6))  # fmt: skip
        elif kind == "moving":
            x = int(0.05 * width) + (width // 2) * index // max(1, frames - 1)
            found.append(draw_text(image, names[2], (x, int(0.93 * height)), scale=0.6))
        elif kind == "changing":
            clock = f"10:15:{index % 60:02d}"
            found.append(draw_text(image, clock, (int(0.02 * width), int(0.95 * height)),
                                   scale=0.6))  # fmt: skip
            depth = f"DEPTH {16 - index % 9}cm"
            found.append(draw_text(image, depth, (int(0.82 * width), int(0.6 * height)),
                                   scale=0.5, thickness=1, clinical=True))  # fmt: skip
            if index >= frames - frames // 3:
                found.append(draw_text(image, names[3], (int(0.40 * width), int(0.45 * height)),
                                       scale=0.6))  # fmt: skip
        else:
            raise ValueError(f"unknown cine kind {kind!r}")
        out[index] = canvas
        planted.append(found)
    return out, planted
