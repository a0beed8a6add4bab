"""Benchmark burned-in text redaction per OCR engine and mode: generated images with known text,
harder draws, and real CT/MR/NM/CR images without text.

    .venv/bin/python scripts/bench_pixels.py            # 60 images + 3 cines + 20 hard, both engines
    .venv/bin/python scripts/bench_pixels.py --quick    # 8 images + 1 cine + 2 hard + 3 real files
    .venv/bin/python scripts/bench_pixels.py --write docs/benchmarks-pixels.md
    .venv/bin/python scripts/bench_pixels.py --speed --json   # issue 17's three figures

`speed_figures()` (and `--speed --json`) gives {"ocr_ms_per_image", "cine60_ratio", "recall",
...}: RapidOCR, REDACT_ALL_TEXT, in this process; scripts/bench.py prints them.

Each engine runs in its own process so that peak RSS is that engine's. Metrics:
string recall (identifying strings with >= 99% of their ink blanked; every seed is one image),
box recall (planted text boxes, clinical ones too, >= 90% blanked), the share of non-text pixels
changed (outside the planted boxes + margin), clinical labels kept (REDACT_SENSITIVE_TEXT),
strings REDACT_ALL_TEXT blanked but REDACT_SENSITIVE_TEXT missed, images whose redaction would
pass the default max_redacted_fraction (quarantined), time per image and frame; on real images
without text: pixels changed (mean, max) and files that would be quarantined.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
from textimages import (  # noqa: E402
    Planted,
    cine_frames,
    hard_text_image,
    strings_missed,
    text_image,
    to_stored,
)

from deid_node.config import PixelsConfig  # noqa: E402
from deid_node.deid.pixels import redact_pixels  # noqa: E402
from deid_node.errors import PixelError  # noqa: E402
from deid_node.modes import DeidentifyRedactTextMode as Mode  # noqa: E402

MODES = (Mode.REDACT_ALL_TEXT, Mode.REDACT_SENSITIVE_TEXT)
ENGINES = ("rapidocr", "easyocr")
H, W = 600, 800
DEFAULT_LIMIT = getattr(PixelsConfig(), "max_redacted_fraction", 0.05)
# Real images without burned-in text (pydicom's test files and the pydicom-data package).
REAL_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "693_UNCI.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "MR2_UNCI.dcm",
    "eCT_Supplemental.dcm",
    "emri_small.dcm",
    "examples_overlay.dcm",
    "JPEG2000_UNC.dcm",
    "JPGExtended.dcm",
    "RG1_UNCI.dcm",
    "693_J2KI.dcm",
    "MR2_J2KI.dcm",
    "MR_small_bigendian.dcm",
    "emri_small_big_endian.dcm",
)


def cases(count: int, cines: int, hard: int):
    """(kind, stored frames before, photometric, ink masks, planted, header name) per case."""
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
        kind = f"{photometric}{'-inverted' if inverted else ''}"
        yield kind, stored, photometric, [ink], planted, None
    for seed in range(cines):
        image, planted = text_image(200 + seed, H, W, colour=True, min_scale=0.5)
        blank, _ = text_image(200 + seed, H, W, colour=True, texts=(), clinical=False)
        rng = np.random.default_rng(seed)
        frames = np.stack([image] * 8)
        for index in range(2, 8):  # the sector moves, the overlay stays
            frames[index, 200:400, 250:550] = rng.integers(0, 120, (200, 300, 3), dtype=np.uint8)
        ink = _ink(image, blank, planted)
        yield "RGB-cine-8", frames, "RGB", [ink] * 8, planted, None
    for seed in range(hard):
        image, planted, header = hard_text_image(seed)
        blank, _, _ = hard_text_image(seed, blank=True)
        if image.ndim == 3:
            stored, photometric = image, "RGB"
        else:
            stored, photometric = to_stored(image, 12), "MONOCHROME2"
        yield "hard", stored, photometric, [_ink(image, blank, planted)], planted, header


def _ink(image: np.ndarray, blank: np.ndarray, planted: list[Planted]) -> list[np.ndarray]:
    drawn = image != blank
    if drawn.ndim == 3:
        drawn = drawn.any(axis=2)
    return [drawn & p.mask(drawn.shape) for p in planted]


def run_engine(
    engine: str, count: int, cines: int, hard: int, real: int, modes: tuple[Mode, ...] = MODES
) -> dict:
    # The guard is measured, not applied: every image is redacted and its share counted.
    config = _config(engine, max_redacted_fraction=1.0)
    from deid_node.ocr import get_engine

    t0 = time.perf_counter()
    get_engine(engine)
    load = time.perf_counter() - t0
    out: dict = {"engine": engine, "load_s": load, "modes": {}, "real": {}}
    blanked: dict[str, set[tuple[int, int]]] = {}
    for mode in modes:
        strings = found = boxes = boxes_hit = clinical = clinical_kept = 0
        hard_strings = hard_found = over_limit = 0
        outside_changed = outside_total = 0
        seconds = frames_total = 0.0
        single: list[float] = []
        per_seed: list[float] = []
        blanked[mode.value] = hits = set()
        missed: list[str] = []
        for case, (kind, stored, photometric, inks, planted, header) in enumerate(
            cases(count, cines, hard)
        ):
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
            identifiers = [PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"]]
            if header:
                identifiers = [header, PHI["PatientID"], PHI["PatientBirthDate"]]
            before = stored if nframes > 1 else stored[np.newaxis]
            t = time.perf_counter()
            outcome = redact_pixels(ds, mode, config, identifiers)
            elapsed = time.perf_counter() - t
            over_limit += int(getattr(outcome, "changed_fraction", 0.0) > DEFAULT_LIMIT)
            seconds += elapsed
            frames_total += nframes
            if nframes == 1:
                single.append(elapsed)
            after = ds.pixel_array if nframes > 1 else ds.pixel_array[np.newaxis]
            seed_strings = seed_found = 0
            for index in range(nframes):
                changed = before[index] != after[index]
                if changed.ndim == 3:
                    changed = changed.any(axis=2)
                text_zone = np.zeros(changed.shape, bool)
                for number, (p, ink) in enumerate(zip(planted, inks[index], strict=True)):
                    text_zone |= p.mask(changed.shape, config.margin_px + 10)
                    covered = changed | _is_fill(after[index], ds)
                    share = covered[ink].mean() if ink.any() else 1.0
                    box_share = covered[p.mask(changed.shape)].mean()
                    if p.clinical:
                        clinical += 1
                        clinical_kept += int(box_share < 0.5)
                    else:
                        seed_strings += 1
                        ok = share >= 0.99
                        seed_found += int(ok)
                        if kind == "hard":
                            hard_strings += 1
                            hard_found += int(ok)
                        else:
                            strings += 1
                            found += int(ok)
                        if ok:
                            hits.add((case, index * 100 + number))
                        else:
                            missed.append(f"{kind}#{case}/frame{index}/string{number}")
                    if mode is Mode.REDACT_ALL_TEXT or not p.clinical:
                        boxes += 1
                        boxes_hit += int(box_share >= 0.9)
                outside_changed += int((changed & ~text_zone).sum())
                outside_total += int((~text_zone).sum())
            per_seed.append(seed_found / seed_strings if seed_strings else 1.0)
        out["modes"][mode.value] = {
            "string_recall": found / strings,
            "strings": strings,
            "min_seed_recall": min(per_seed),
            "hard_string_recall": hard_found / hard_strings if hard_strings else None,
            "box_recall": boxes_hit / boxes,
            "nontext_changed": outside_changed / outside_total,
            "clinical_kept": clinical_kept / clinical if clinical else None,
            "over_limit": over_limit,
            "ms_per_image": 1000 * seconds / (count + cines + hard),
            "ms_per_single_frame_800x600": 1000 * float(np.mean(single)) if single else None,
            "ms_per_frame": 1000 * seconds / frames_total,
            "images": count + cines + hard,
            "hard_images": hard,
            "frames": int(frames_total),
            "missed": missed,
        }
    if len(blanked) == len(MODES):
        all_text, sensitive = (blanked[m.value] for m in MODES)
        out["sensitive_missed_of_all"] = len(all_text - sensitive)
    out["real"] = run_real(engine, REAL_FILES[:real])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def speed_figures(
    images: int = 10, frames: int = 60, recall_images: int = 60, hard: int = 20
) -> dict:
    """Issue 17's figures for RapidOCR in REDACT_ALL_TEXT, measured in this process:
    ocr_ms_per_image: mean wall ms of redact_pixels on `images` ordinary 800x600 RGB draws
    (engine loaded and warmed first); cine60_ratio: a `frames`-frame 800x600 cine with still
    text on a moving sector (textimages.cine_frames) against its first frame alone (median of
    3); cine_strings_missed: identifying strings of that cine with under 99% of their ink
    blanked in some frame; recall / hard_recall: string recall of the ordinary and hard draws
    as in the table (recall_images + hard images; 0 skips it)."""
    from deid_node.ocr import get_engine

    config = _config("rapidocr", max_redacted_fraction=1.0)
    get_engine("rapidocr")
    warm, _ = text_image(99, H, W, colour=True)
    redact_pixels(make_instance("US", photometric="RGB", pixel_array=warm), MODES[0], config)
    seconds = []
    for seed in range(images):
        image, _ = text_image(100 + seed, H, W, colour=True, min_scale=0.4, max_scale=1.0)
        ds = make_instance("US", photometric="RGB", pixel_array=image)
        t = time.perf_counter()
        redact_pixels(ds, MODES[0], config)
        seconds.append(time.perf_counter() - t)
    cine, planted = cine_frames(0, frames, "static", H, W)
    blank, _ = cine_frames(0, frames, "static", H, W, blank=True)
    one = []
    for _ in range(3):
        ds = make_instance("US", photometric="RGB", pixel_array=cine[0])
        t = time.perf_counter()
        redact_pixels(ds, MODES[0], config)
        one.append(time.perf_counter() - t)
    ds = make_instance("US", photometric="RGB", pixel_array=cine[0])
    ds.NumberOfFrames, ds.PixelData = frames, cine.tobytes()
    t = time.perf_counter()
    outcome = redact_pixels(ds, MODES[0], config)
    cine_s = time.perf_counter() - t
    after = ds.pixel_array.reshape(cine.shape)
    missed = sum(
        strings_missed(cine[index], blank[index], after[index], frame_planted)[0]
        for index, frame_planted in enumerate(planted)
    )
    out = {
        "ocr_ms_per_image": 1000 * float(np.mean(seconds)),
        "ocr_ms_per_image_median": 1000 * float(np.median(seconds)),
        "images": images,
        "cine_frames": frames,
        "cine_s": cine_s,
        "one_frame_s": float(np.median(one)),
        "cine60_ratio": cine_s / float(np.median(one)),
        "cine_reasons": list(outcome.reasons),
        "cine_strings_missed": missed,
        "recall": None,
        "hard_recall": None,
        "cpus": _cpus(),
        "load_avg_1min": os.getloadavg()[0],
    }
    if recall_images or hard:
        result = run_engine("rapidocr", recall_images, 0, hard, 0, modes=(MODES[0],))
        m = result["modes"][MODES[0].value]
        out["recall"], out["hard_recall"] = m["string_recall"], m["hard_string_recall"]
        out["strings"], out["missed"] = m["strings"], m["missed"]
    return out


# RapidOCR configurations compared by --ab (issue 17 item 2), each an engine built in this
# process: "before" is RapidOCR's own sessions (spinning, no arena, float64 normalising).
RAPID_VARIANTS = {
    "before": {"tuned": False},
    "tuned": {"tuned": True},
    "tunedb1": {"tuned": True, "rec_batch_num": 1},
    "tunedb2": {"tuned": True, "rec_batch_num": 2},
}


def _use_rapid(variant: str, built: dict) -> None:
    """Make `variant` the engine that get_engine("rapidocr", ...) returns in this process."""
    from deid_node import ocr
    from deid_node.ocr.rapid import RapidOcrEngine

    if variant not in built:
        built[variant] = RapidOcrEngine(**RAPID_VARIANTS[variant])
    for device in ("auto", "cpu"):
        ocr._engines[("rapidocr", device)] = built[variant]


def ab_figures(variants: list[str], images: int, recall_images: int, hard: int) -> dict:
    """RapidOCR configurations side by side in one process: per 800x600 ordinary RGB draw,
    every variant redacts it in turn (order rotated per image), wall and CPU ms per variant;
    then each variant's string recall on `recall_images` ordinary + `hard` hard draws."""
    config = _config("rapidocr", max_redacted_fraction=1.0)
    built: dict = {}
    warm, _ = text_image(99, H, W, colour=True)
    for variant in variants:
        _use_rapid(variant, built)
        redact_pixels(make_instance("US", photometric="RGB", pixel_array=warm), MODES[0], config)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    loads = []
    for seed in range(images):
        image, _ = text_image(100 + seed, H, W, colour=True, min_scale=0.4, max_scale=1.0)
        order = variants[seed % len(variants) :] + variants[: seed % len(variants)]
        for variant in order:
            _use_rapid(variant, built)
            ds = make_instance("US", photometric="RGB", pixel_array=image)
            t, c = time.perf_counter(), time.process_time()
            redact_pixels(ds, MODES[0], config)
            wall[variant].append(1000 * (time.perf_counter() - t))
            cpu[variant].append(1000 * (time.process_time() - c))
        loads.append(os.getloadavg()[0])
    out: dict = {"images": images, "cpus": _cpus(), "load_avg_1min": [min(loads), max(loads)]}
    for variant in variants:
        w, c = np.array(wall[variant]), np.array(cpu[variant])
        out[variant] = {
            "wall_ms_median": float(np.median(w)),
            "wall_ms_p25_p75": [float(np.percentile(w, 25)), float(np.percentile(w, 75))],
            "wall_ms_min_max": [float(w.min()), float(w.max())],
            "cpu_ms_median": float(np.median(c)),
        }
    for variant in variants if recall_images or hard else []:
        _use_rapid(variant, built)
        m = run_engine("rapidocr", recall_images, 0, hard, 0, modes=(MODES[0],))["modes"]
        m = m[MODES[0].value]
        out[variant].update(
            recall=m["string_recall"], hard_recall=m["hard_string_recall"], missed=m["missed"]
        )
    return out


def _config(engine: str, **limits: float) -> PixelsConfig:
    """The engine's config; --baseline runs of older code, whose config has no guard, too."""
    try:
        return PixelsConfig(ocr_engine=engine, **limits)  # type: ignore[arg-type]
    except TypeError:
        return PixelsConfig(ocr_engine=engine)  # type: ignore[arg-type]


def run_real(engine: str, names: tuple[str, ...]) -> dict:
    """Real CT/MR/NM/CR images without text through both modes, with the default guard."""
    import pydicom
    from pydicom.data import get_testdata_file

    config = _config(engine)
    result: dict = {"files": list(names)}
    for mode in MODES:
        fractions: list[float] = []
        quarantined: list[str] = []
        for name in names:
            ds = pydicom.dcmread(get_testdata_file(name))
            before = ds.pixel_array.copy()
            try:
                redact_pixels(ds, mode, config, [PHI["PatientName"]])
            except PixelError:
                quarantined.append(name)
                continue
            after = ds.pixel_array
            changed = before != after
            if changed.ndim == 4 or (changed.ndim == 3 and ds.SamplesPerPixel == 3):
                changed = changed.any(axis=-1)
            fractions.append(float(changed.mean()))
        result[mode.value] = {
            "mean_changed": float(np.mean(fractions)) if fractions else None,
            "max_changed": float(np.max(fractions)) if fractions else None,
            "quarantined": quarantined,
        }
    return result


def _is_fill(frame: np.ndarray, ds) -> np.ndarray:
    """Pixels inside a flat filled region count as blanked even where the fill equals their old
    value (dark text on a black fill, a grey pixel under a grey ring fill): a pixel whose 3x3
    neighbourhood is constant; the noisy backgrounds never are."""
    import cv2

    del ds
    kernel = np.ones((3, 3), np.uint8)
    channels = [frame] if frame.ndim == 2 else [frame[:, :, c] for c in range(frame.shape[2])]
    flat = np.ones(frame.shape[:2], bool)
    for channel in channels:
        channel = np.ascontiguousarray(channel)
        flat &= cv2.dilate(channel, kernel) == cv2.erode(channel, kernel)
    return flat


def render(results: list[dict], command: str) -> str:
    first = results[0]["modes"]["REDACT_ALL_TEXT"]
    lines = [
        "# Pixel redaction benchmark",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Machine: {platform.machine()}, {_cpus()} cores, no GPU, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}",
        f"- Command: `{command}`",
        f"- Data: {first['images']} generated 800x600 images, one seed each "
        "(tests/textimages.py). Ordinary draws: 4 identifying strings in corners and edges + 1 "
        "clinical label, 5 Hershey fonts, scales 0.4-1.0 (text 8-30 px high), "
        "white/yellow/green/cyan/grey text, noisy anatomy-like backgrounds; RGB, MONOCHROME2 "
        "12-bit, MONOCHROME1 12-bit, dark text on light (inverted); 8-frame RGB cines with a "
        f"moving sector and a static overlay. {first['hard_images']} hard draws "
        "(`hard_text_image`): 6-14 px text 50-80 grey levels above its background, the header's "
        'own name written in other orders, cases and initials ("Mary Smith", "SMITH, MARY", '
        '"M. Smith", "smith mary") next to other identifiers.',
        "- String recall (ordinary draws and cines; hard draws in their own column): "
        "identifying strings with >= 99% of their ink pixels blanked; min/seed: "
        "the worst single image. Box recall: planted boxes >= 90% blanked (clinical too in "
        "REDACT_ALL_TEXT). Non-text changed: pixels changed outside planted boxes + margin + "
        "10 px. Clinical kept: REDACT_SENSITIVE_TEXT labels left readable. Over guard: images "
        f"whose redaction changes more than the default max_redacted_fraction "
        f"({DEFAULT_LIMIT:.0%}) of a frame, i.e. quarantined for review at the default.",
        "",
        "| engine | mode | string recall | min/seed | hard draws | box recall "
        "| non-text changed | clinical kept | over guard | ms/image "
        "| ms per 800x600 frame (single-frame) | ms/frame (all) | model load s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for mode, m in r["modes"].items():
            kept = "-" if m["clinical_kept"] is None else f"{m['clinical_kept']:.0%}"
            if mode == "REDACT_ALL_TEXT":
                kept = "n/a"
            hard = "-" if m["hard_string_recall"] is None else f"{m['hard_string_recall']:.1%}"
            lines.append(
                f"| {r['engine']} | {mode} | {m['string_recall']:.1%} ({m['strings']}) "
                f"| {m['min_seed_recall']:.0%} | {hard} | {m['box_recall']:.1%} "
                f"| {m['nontext_changed']:.2%} | {kept} | {m['over_limit']}/{m['images']} "
                f"| {m['ms_per_image']:.0f} "
                f"| {m['ms_per_single_frame_800x600']:.0f} | {m['ms_per_frame']:.0f} "
                f"| {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    lines += [
        "",
        "Identifying strings REDACT_ALL_TEXT blanked and REDACT_SENSITIVE_TEXT missed: "
        + ", ".join(f"{r['engine']} {r['sensitive_missed_of_all']}" for r in results)
        + ".",
        "",
        "Real images without burned-in text (pydicom's test files and pydicom-data: "
        + ", ".join(results[0]["real"].get("files", []))
        + "), default config (max_redacted_fraction "
        + f"{DEFAULT_LIMIT:.0%}); pixels changed counts stored values that changed:",
        "",
        "| engine | mode | files | mean pixels changed | max pixels changed | quarantined |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        files = len(r["real"].get("files", []))
        for mode in ("REDACT_ALL_TEXT", "REDACT_SENSITIVE_TEXT"):
            m = r["real"].get(mode)
            if not m or m["mean_changed"] is None:
                continue
            lines.append(
                f"| {r['engine']} | {mode} | {files} | {m['mean_changed']:.3%} "
                f"| {m['max_changed']:.3%} | {', '.join(m['quarantined']) or 'none'} |"
            )
    lines.append("")
    return "\n".join(lines)


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images + 1 cine + 2 hard")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--hard", type=int, default=None, help="hard draws (seeds)")
    parser.add_argument("--real", type=int, default=None, help="real files without text")
    parser.add_argument("--write", type=Path, help="write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--speed", action="store_true", help="issue 17's figures (speed_figures)")
    parser.add_argument("--json", action="store_true", help="with --speed: one JSON object")
    parser.add_argument("--frames", type=int, default=60, help="with --speed: cine frames")
    parser.add_argument(
        "--ab",
        help="RapidOCR variants side by side in one process, e.g. before,tuned "
        "(--images: timed draws, default 20; --hard: hard draws for recall, default 20; "
        "recall on 60 ordinary draws unless --quick)",
    )
    args = parser.parse_args()
    if args.ab:
        figures = ab_figures(
            args.ab.split(","), 20 if args.images is None else args.images,
            0 if args.quick else 60, 20 if args.hard is None else args.hard,
        )  # fmt: skip
        print(json.dumps(figures, indent=1))
        return
    if args.speed:
        quick = (3, 0, 0) if args.quick else (10, 60, 20)
        figures = speed_figures(
            quick[0], args.frames, quick[1] if args.images is None else args.images,
            quick[2] if args.hard is None else args.hard,
        )  # fmt: skip
        if args.json:
            print(json.dumps(figures))
        else:
            for key, value in figures.items():
                print(f"{key}: {value}")
        return
    # 60 images: 336 identifying strings, so one miss moves recall by 0.3%, not 0.7%.
    count, cines, hard, real = (8, 1, 2, 3) if args.quick else (60, 3, 20, len(REAL_FILES))
    count = count if args.images is None else args.images
    hard = hard if args.hard is None else args.hard
    real = real if args.real is None else args.real
    if args.worker:
        print(json.dumps(run_engine(args.worker, count, cines, hard, real)))
        return
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", engine]
        if args.quick:
            cmd.append("--quick")
        for flag, value in (
            ("--images", args.images),
            ("--hard", args.hard),
            ("--real", args.real),
        ):
            if value is not None:
                cmd += [flag, str(value)]
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
