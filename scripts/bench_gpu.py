"""Issue 17's GPU rows: EasyOCR on a CUDA GPU against the same machine's CPU, in one process.

    .venv/bin/python scripts/bench_gpu.py                 # prints the figures as JSON
    .venv/bin/python scripts/bench_gpu.py --json out.json --quick

Without a CUDA GPU it says why and exits 0 (scripts/bench.py then prints no GPU rows). Figures,
all REDACT_ALL_TEXT through `deid_node.deid.pixels.redact_pixels` (what the node runs):

- per image: 800x600 RGB draws with identifying text (tests/textimages.text_image), mean and
  median wall ms on the GPU, and on the CPU with torch limited to 2 threads (the project's
  2-core machines; the same draws), string recall on each (a string counts as found when
  >= 99% of its ink changed);
- frames together: 30 800x600 frames through the engine's batched call (readtext_batched, 8
  frames per detector batch) against one frame at a time, ms per frame, and the GPU memory peak;
- cines: 60-frame 800x600 cines whose text is static, moving or changing
  (tests/textimages.cine_frames) on the GPU, the whole cine against its first frame alone, with
  the identifying strings left readable in any frame (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dicomgen import make_instance  # noqa: E402
from textimages import Planted, cine_frames, strings_missed, text_image  # noqa: E402

from deid_node.config import PixelsConfig  # noqa: E402
from deid_node.deid.pixels import redact_pixels  # noqa: E402
from deid_node.modes import DeidentifyRedactTextMode as Mode  # noqa: E402

H, W = 600, 800
CPU_THREADS = 2


def _draw(seed: int) -> tuple[np.ndarray, np.ndarray, list[Planted]]:
    """(image, the same background without text, planted strings)."""
    image, planted = text_image(seed, H, W, colour=True, min_scale=0.4, max_scale=1.0)
    blank, _ = text_image(seed, H, W, colour=True, texts=(), clinical=False)
    return image, blank, planted


def _per_image(config: PixelsConfig, seeds: range) -> dict:
    seconds, missed, total = [], 0, 0
    for seed in seeds:
        image, blank, planted = _draw(seed)
        ds = make_instance("US", photometric="RGB", pixel_array=image)
        t = time.perf_counter()
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
        seconds.append(time.perf_counter() - t)
        m, n = strings_missed(image, blank, ds.pixel_array, planted)
        missed, total = missed + m, total + n
    return {
        "images": len(seeds),
        "ms_mean": 1000 * float(np.mean(seconds)),
        "ms_median": 1000 * float(np.median(seconds)),
        "string_recall": (total - missed) / total if total else None,
        "strings": total,
    }


def _frames_together(engine, count: int) -> dict:
    import torch

    frames = [_draw(300 + i)[0] for i in range(count)]
    engine.recognize_batch(frames[:2], batched=True)  # warm the batched shapes
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    together = engine.recognize_batch(frames, batched=True)
    _sync()
    batched_s = time.perf_counter() - t
    peak = _peak_gib()
    t = time.perf_counter()
    alone = engine.recognize_batch(frames, batched=False)
    _sync()
    single_s = time.perf_counter() - t
    same = sum(
        [(b.x, b.y, b.w, b.h, b.text) for b in x] == [(b.x, b.y, b.w, b.h, b.text) for b in y]
        for x, y in zip(together, alone, strict=True)
    )
    return {
        "frames": count,
        "batched_ms_per_frame": 1000 * batched_s / count,
        "single_ms_per_frame": 1000 * single_s / count,
        "frames_with_identical_boxes": same,
        "gpu_memory_peak_gib": peak,
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _cine(config: PixelsConfig, kind: str, frames: int) -> dict:
    cine, planted = cine_frames(0, frames, kind, H, W)
    blank, _ = cine_frames(0, frames, kind, H, W, blank=True)
    one = []
    for _ in range(3):
        ds = make_instance("US", photometric="RGB", pixel_array=cine[0])
        t = time.perf_counter()
        redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
        one.append(time.perf_counter() - t)
    ds = make_instance("US", photometric="RGB", pixel_array=cine[0])
    ds.NumberOfFrames, ds.PixelData = frames, cine.tobytes()
    t = time.perf_counter()
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
    cine_s = time.perf_counter() - t
    after = ds.pixel_array.reshape(cine.shape)
    missed = sum(strings_missed(cine[i], blank[i], after[i], planted[i])[0] for i in range(frames))
    return {
        "kind": kind,
        "frames": frames,
        "cine_s": cine_s,
        "one_frame_s": float(np.median(one)),
        "ratio": cine_s / float(np.median(one)),
        "reasons": list(outcome.reasons),
        "strings_missed": missed,
    }


def gpu_figures(
    gpu_images: int = 20, cpu_images: int = 5, frames: int = 60, device: str = "cuda"
) -> dict:
    """The figures above, or {"gpu": None, "why": ...} where torch sees no CUDA GPU.
    device "cpu": the "GPU" side runs on the CPU (a dry run of this script)."""
    from deid_node.ocr import cuda_unavailable, get_engine

    try:
        why = cuda_unavailable("easyocr")
    except ImportError as exc:  # the easyocr extra is not installed
        why = f"the easyocr extra is not installed ({exc.name})"
    if why is not None and device == "cuda":
        return {"gpu": None, "why": why}
    import torch

    cuda = PixelsConfig(ocr_engine="easyocr", device=device, max_redacted_fraction=1.0)
    cpu = PixelsConfig(ocr_engine="easyocr", device="cpu", max_redacted_fraction=1.0)
    t = time.perf_counter()
    engine = get_engine("easyocr", device)
    load_s = time.perf_counter() - t
    warm, _, _ = _draw(99)
    redact_pixels(
        make_instance("US", photometric="RGB", pixel_array=warm), Mode.REDACT_ALL_TEXT, cuda
    )
    out: dict = {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "engine_load_s": load_s,
    }
    seeds = range(100, 100 + gpu_images)
    out["image_gpu"] = _per_image(cuda, seeds)
    out["frames_together"] = _frames_together(engine, 30 if frames >= 30 else frames)
    out["cines_gpu"] = [_cine(cuda, kind, frames) for kind in ("static", "moving", "changing")]
    out["gpu_memory_peak_gib"] = _peak_gib()
    torch.set_num_threads(CPU_THREADS)
    get_engine("easyocr", "cpu")
    redact_pixels(
        make_instance("US", photometric="RGB", pixel_array=warm), Mode.REDACT_ALL_TEXT, cpu
    )
    out["image_cpu"] = _per_image(cpu, range(100, 100 + cpu_images))
    out["image_cpu"]["threads"] = CPU_THREADS
    out["image_speedup"] = out["image_cpu"]["ms_mean"] / out["image_gpu"]["ms_mean"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="3 images, 1 on the CPU, 8 frames")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a dry run of this script where there is no GPU (the 'GPU' side on the CPU)",
    )
    args = parser.parse_args()
    sizes = {"gpu_images": 3, "cpu_images": 1, "frames": 8} if args.quick else {}
    figures = gpu_figures(**sizes, device=args.device)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
