"""Benchmark burned-in text redaction per OCR engine and mode on generated images with known text.

    .venv/bin/python scripts/bench_pixels.py            # 60 images + 3 cines, both engines
    .venv/bin/python scripts/bench_pixels.py --quick    # 8 images + 1 cine
    .venv/bin/python scripts/bench_pixels.py --write docs/benchmarks-pixels.md

Each engine runs in its own process so that peak RSS is that engine's. Metrics:
string recall (identifying strings with >= 99% of their ink blanked), box recall (planted text
boxes, clinical ones too, >= 90% blanked), the share of non-text pixels changed (outside the
planted boxes + margin), clinical labels kept (REDACT_SENSITIVE_TEXT), time per image and frame.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dicomgen import PHI, make_instance  # noqa: E402
from textimages import Planted, text_image, to_stored  # noqa: E402

from deid_node.config import PixelsConfig  # noqa: E402
from deid_node.deid.pixels import redact_pixels  # noqa: E402
from deid_node.modes import DeidentifyRedactTextMode as Mode  # noqa: E402

MODES = (Mode.REDACT_ALL_TEXT, Mode.REDACT_SENSITIVE_TEXT)
ENGINES = ("rapidocr", "easyocr")
H, W = 600, 800


def cases(count: int, cines: int):
    """(kind, dataset factory, stored frames before, ink masks, planted) per case."""
    for seed in range(count):
        variant = seed % 5
        colour = variant in (0, 1, 4)
        inverted = variant == 3
        image, planted = text_image(
            100 + seed, H, W, colour=colour, inverted=inverted, min_scale=0.4, max_scale=1.0
        )
        blank, _ = text_image(
            100 + seed, H, W, colour=colour, inverted=inverted, texts=(), clinical=False
        )
        if colour:
            stored, photometric = image, "RGB"
        elif variant == 2:
            stored, photometric = to_stored(image, 12, monochrome1=True), "MONOCHROME1"
        else:
            stored, photometric = to_stored(image, 12), "MONOCHROME2"
        ink = _ink(image, blank, planted)
        yield f"{photometric}{'-inverted' if inverted else ''}", stored, photometric, [ink], planted
    for seed in range(cines):
        image, planted = text_image(200 + seed, H, W, colour=True, min_scale=0.5)
        blank, _ = text_image(200 + seed, H, W, colour=True, texts=(), clinical=False)
        rng = np.random.default_rng(seed)
        frames = np.stack([image] * 8)
        for index in range(2, 8):  # the sector moves, the overlay stays
            frames[index, 200:400, 250:550] = rng.integers(0, 120, (200, 300, 3), dtype=np.uint8)
        ink = _ink(image, blank, planted)
        yield "RGB-cine-8", frames, "RGB", [ink] * 8, planted


def _ink(image: np.ndarray, blank: np.ndarray, planted: list[Planted]) -> list[np.ndarray]:
    drawn = image != blank
    if drawn.ndim == 3:
        drawn = drawn.any(axis=2)
    return [drawn & p.mask(drawn.shape) for p in planted]


def run_engine(engine: str, count: int, cines: int) -> dict:
    config = PixelsConfig(ocr_engine=engine)
    from deid_node.ocr import get_engine

    t0 = time.perf_counter()
    get_engine(engine)
    load = time.perf_counter() - t0
    identifiers = [PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"]]
    out: dict = {"engine": engine, "load_s": load, "modes": {}}
    for mode in MODES:
        strings = found = boxes = boxes_hit = clinical = clinical_kept = 0
        outside_changed = outside_total = 0
        seconds = frames_total = 0.0
        single: list[float] = []
        for _kind, stored, photometric, inks, planted in cases(count, cines):
            nframes = stored.shape[0] if inks and len(inks) > 1 else 1
            first = stored[0] if nframes > 1 else stored
            ds = make_instance("US", photometric="RGB" if first.ndim == 3 else "MONOCHROME2",
                               pixel_array=first)  # fmt: skip
            if nframes > 1:
                ds.NumberOfFrames = nframes
                ds.PixelData = stored.tobytes()
            if photometric == "MONOCHROME1":
                ds.PhotometricInterpretation = "MONOCHROME1"
            if first.dtype == np.uint16:
                ds.BitsStored, ds.HighBit = 12, 11
            before = stored if nframes > 1 else stored[np.newaxis]
            t = time.perf_counter()
            redact_pixels(ds, mode, config, identifiers)
            elapsed = time.perf_counter() - t
            seconds += elapsed
            frames_total += nframes
            if nframes == 1:
                single.append(elapsed)
            after = ds.pixel_array if nframes > 1 else ds.pixel_array[np.newaxis]
            for index in range(nframes):
                changed = before[index] != after[index]
                if changed.ndim == 3:
                    changed = changed.any(axis=2)
                text_zone = np.zeros(changed.shape, bool)
                for p, ink in zip(planted, inks[index], strict=True):
                    text_zone |= p.mask(changed.shape, config.margin_px + 10)
                    covered = changed | _is_fill(after[index], ds)
                    share = covered[ink].mean() if ink.any() else 1.0
                    box_share = covered[p.mask(changed.shape)].mean()
                    if p.clinical:
                        clinical += 1
                        clinical_kept += int(box_share < 0.5)
                    else:
                        strings += 1
                        found += int(share >= 0.99)
                    if mode is Mode.REDACT_ALL_TEXT or not p.clinical:
                        boxes += 1
                        boxes_hit += int(box_share >= 0.9)
                outside_changed += int((changed & ~text_zone).sum())
                outside_total += int((~text_zone).sum())
        out["modes"][mode.value] = {
            "string_recall": found / strings,
            "box_recall": boxes_hit / boxes,
            "nontext_changed": outside_changed / outside_total,
            "clinical_kept": clinical_kept / clinical if clinical else None,
            "ms_per_image": 1000 * seconds / (count + cines),
            "ms_per_single_frame_800x600": 1000 * float(np.mean(single)) if single else None,
            "ms_per_frame": 1000 * seconds / frames_total,
            "images": count + cines,
            "frames": int(frames_total),
        }
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _is_fill(frame: np.ndarray, ds) -> np.ndarray:
    """Pixels already at the fill value count as blanked (dark text on a black fill)."""
    if frame.ndim == 3:
        return (frame == frame.min(axis=(0, 1))).all(axis=2)
    return frame == (frame.max() if ds.PhotometricInterpretation == "MONOCHROME1" else frame.min())


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Pixel redaction benchmark",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Machine: {platform.machine()}, {_cpus()} cores, no GPU, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}",
        f"- Command: `{command}`",
        f"- Data: {results[0]['modes']['REDACT_ALL_TEXT']['images']} generated 800x600 images "
        "(tests/textimages.py): 4 identifying strings in corners and edges + 1 clinical label "
        "each, 5 Hershey fonts, scales 0.4-1.0 (text 8-30 px high), "
        "white/yellow/green/cyan/grey text, noisy anatomy-like backgrounds; RGB, MONOCHROME2 "
        "12-bit, MONOCHROME1 12-bit, dark text on light (inverted); 8-frame RGB cine with a moving "
        "sector and a static overlay.",
        "- String recall: identifying strings with >= 99% of their ink pixels blanked. Box recall: "
        "planted boxes >= 90% blanked (clinical too in REDACT_ALL_TEXT). Non-text changed: pixels "
        "changed outside planted boxes + margin + 10 px. Clinical kept: REDACT_SENSITIVE_TEXT "
        "labels left readable.",
        "",
        "| engine | mode | string recall | box recall | non-text changed | clinical kept "
        "| ms/image | ms per 800x600 frame (single-frame) | ms/frame (all) | model load s "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for mode, m in r["modes"].items():
            kept = "-" if m["clinical_kept"] is None else f"{m['clinical_kept']:.0%}"
            if mode == "REDACT_ALL_TEXT":
                kept = "n/a"
            lines.append(
                f"| {r['engine']} | {mode} | {m['string_recall']:.1%} | {m['box_recall']:.1%} "
                f"| {m['nontext_changed']:.2%} | {kept} | {m['ms_per_image']:.0f} "
                f"| {m['ms_per_single_frame_800x600']:.0f} | {m['ms_per_frame']:.0f} "
                f"| {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    lines.append("")
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images + 1 cine")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--write", type=Path, help="write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # 60 images: 336 identifying strings, so one miss moves recall by 0.3%, not 0.7%.
    count, cines = (8, 1) if args.quick else (60, 3)
    if args.images is not None:
        count = args.images
    if args.worker:
        print(json.dumps(run_engine(args.worker, count, cines)))
        return
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", engine]
        if args.quick:
            cmd.append("--quick")
        if args.images is not None:
            cmd += ["--images", str(args.images)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    command = "python scripts/bench_pixels.py " + " ".join(sys.argv[1:])
    table = render(results, command.strip())
    print(table)
    if args.write:
        args.write.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
