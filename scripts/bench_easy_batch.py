"""EasyOCR's batched frame reading, old against new, on the same frames in one process: today's
readtext_batched (one recognizer call per frame, per box on the CPU) and the engine's
`_read_frames` (crops of all frames grouped by their own padding width). Prints whether their
results are equal box for box (text and score), how far a single call padded to the widest
crop of all frames would differ (why the crops are grouped by width), and both timings in
interleaved rounds.

    .venv/bin/python scripts/bench_easy_batch.py --device cpu --frames 8 --size 320x240
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from textimages import cine_frames, text_image  # noqa: E402

from deid_node.ocr.easy import _THRESHOLDS, EasyOcrEngine, _read_frames  # noqa: E402

WIDTHS = ("ZYXWORTHA^QUILLIAM 1943", "PIDQX778812", "DOB 1943-11-07", "ACC 99", "L")


def generated(count: int, width: int, height: int) -> list[np.ndarray]:
    """Frames whose widest text differs from frame to frame; every fourth one has no text."""
    frames = []
    for index in range(count):
        if index % 4 == 3:
            texts: tuple[str, ...] = ()
        else:
            texts = (WIDTHS[index % len(WIDTHS)], WIDTHS[(index + 2) % len(WIDTHS)])
        image, _ = text_image(100 + index, height, width, texts=texts, clinical=index % 2 == 0)
        frames.append(image)
    return frames


def real_us() -> list[np.ndarray]:
    """pydicom's US1_UNCR (burned-in text), as is and shifted by a few pixels."""
    import pydicom
    from pydicom.data import get_testdata_file

    rgb = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array
    return [rgb, np.roll(rgb, (7, -13), axis=(0, 1)), np.roll(rgb, (-5, 21), axis=(0, 1))]


def widest_single_call(engine: EasyOcrEngine, chunk: np.ndarray) -> list[list]:
    """The rejected rule: every crop of every frame in one get_text call, padded to the widest."""
    reader, internals = engine._reader, engine._internals
    img, grey = internals.reformat_input_batched(chunk)
    horizontal_agg, free_agg = reader.detect(img, reformat=False, **_THRESHOLDS)
    items, owners, width = [], [], 0
    for frame, (g, horizontal, free) in enumerate(zip(grey, horizontal_agg, free_agg, strict=True)):
        calls = (
            [([b], []) for b in horizontal] + [([], [b]) for b in free]
            if engine._batch == 1 or reader.device == "cpu"
            else [(horizontal, free)]
        )
        for h, f in calls:
            image_list, max_width = internals.get_image_list(h, f, g, model_height=internals.imgH)
            items += image_list
            owners += [frame] * len(image_list)
            width = max(width, int(max_width))
    ignore = "".join(set(reader.character) - set(reader.lang_char))
    read = internals.get_text(
        reader.character, internals.imgH, width, reader.recognizer, reader.converter, items,
        ignore, "greedy", 5, engine._batch, 0.1, 0.5, 0.003, 0, reader.device,
    )  # fmt: skip
    out: list[list] = [[] for _ in chunk]
    for frame, one in zip(owners, read, strict=True):
        out[frame].append(one)
    return out


def compare(old: list[list], new: list[list]) -> tuple[int, int, int, float]:
    """(boxes, boxes whose box or text differs, boxes whose score differs, largest score
    difference); a count mismatch counts every box of that frame as differing."""
    boxes = text = score = 0
    largest = 0.0
    for old_frame, new_frame in zip(old, new, strict=True):
        boxes += len(old_frame)
        if len(old_frame) != len(new_frame):
            text += len(old_frame)
            continue
        for (ob, ot, os_), (nb, nt, ns) in zip(old_frame, new_frame, strict=True):
            text += int(ot != nt or np.asarray(ob).tolist() != np.asarray(nb).tolist())
            score += int(float(os_) != float(ns))
            largest = max(largest, abs(float(os_) - float(ns)))
    return boxes, text, score, largest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cine", action="store_true", help="also a moving-text cine, timed too")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    engine = EasyOcrEngine(args.device, batches=True)
    print(f"device={engine.device} recognizer batch={engine._batch}")
    sets = {"generated": np.stack(generated(args.frames, width, height))}
    if args.cine:
        sets["moving cine"] = cine_frames(1, args.frames, "moving", height, width)[0]
    sets["US1_UNCR x3"] = np.stack(real_us())
    for name, chunk in sets.items():
        old = engine._reader.readtext_batched(chunk, batch_size=engine._batch, **_THRESHOLDS)
        new = _read_frames(engine._reader, engine._internals, chunk, engine._batch)
        wide = widest_single_call(engine, chunk)
        print(
            f"{name}: new vs readtext_batched (boxes, text diffs, score diffs, max score diff): ",
            end="",
        )
        print(compare(old, new))
        print(f"{name}: one call padded to the widest crop vs readtext_batched:   ", end="")
        print(compare(old, wide))
    for name in [n for n in sets if n != "US1_UNCR x3"]:
        time_both(engine, name, sets[name], args.rounds)


def time_both(engine: EasyOcrEngine, name: str, chunk: np.ndarray, rounds: int) -> None:
    """Old and new, interleaved, `rounds` times each (after the warm-up of the checks)."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        for label in ("old", "new"):
            start = time.perf_counter()
            if label == "old":
                engine._reader.readtext_batched(chunk, batch_size=engine._batch, **_THRESHOLDS)
            else:
                _read_frames(engine._reader, engine._internals, chunk, engine._batch)
            times[label].append(time.perf_counter() - start)
    for label, values in times.items():
        each = " ".join(f"{v:.3f}" for v in values)
        median = statistics.median(values)
        print(f"{name} {label}: median {median:.3f} s for {len(chunk)} frames ({each})")


if __name__ == "__main__":
    main()
