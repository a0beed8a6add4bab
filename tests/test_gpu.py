"""[pixels] device: "cuda" without a GPU fails at start-up, "auto" runs where it can, and on a
CUDA GPU both engines run there and redact, cines' frames read in batches (the GPU tests skip on
a machine without one; the batched frame path is also checked on the CPU, batches forced on).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from dicomgen import make_instance
from test_cine import H, W, assert_every_string_gone, cine_instance, redacted_frames
from textimages import (
    blank_image,
    cine_frames,
    draw_text,
    found_strings,
    normalise,
    tesseract_text,
    text_image,
)

from deid_node.config import PixelsConfig, parse_config
from deid_node.deid.pixelcodec import DisplayMapper, decode
from deid_node.deid.pixels import redact_pixels
from deid_node.deid.textscan import scan_frames
from deid_node.errors import ConfigError
from deid_node.modes import DeidentifyRedactTextMode as Mode
from deid_node.ocr import cuda_unavailable, fork_safe, get_engine, recognize_frames

PHI = "PIDQX778812"
# Generated frames carry big text on a mostly black frame (as in test_cine).
EASY_CUDA = PixelsConfig(ocr_engine="easyocr", device="cuda", max_redacted_fraction=0.25)


def burned_in(seed: int = 2, at: tuple[int, int] = (10, 30)) -> tuple[np.ndarray, list]:
    """A 320x240 frame with PHI drawn whole at `at` (a string cut by the frame's edge cannot be
    read whole: the first run on a GPU failed on such a plant, not on the engine)."""
    image = np.repeat(blank_image(seed, 240, 320)[:, :, None], 3, axis=2)
    planted = draw_text(image, PHI, at, scale=0.8)
    assert planted.x >= 0 and planted.y >= 0, planted
    assert planted.x + planted.w <= 320 and planted.y + planted.h <= 240, planted
    return image, [planted]


def assert_redacts(engine, config: PixelsConfig) -> None:
    """redact_pixels with `config` blanks the planted string: its ink is gone, the engine that
    found it no longer reads it, nor (where installed: not on the GPU machines) Tesseract."""
    image, planted = burned_in()
    ds = make_instance("US", photometric="RGB", pixel_array=image)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, config)
    assert outcome.changed and outcome.engine == engine.name
    after = ds.pixel_array
    ink = (image != np.repeat(blank_image(2, 240, 320)[:, :, None], 3, axis=2)).any(axis=2)
    ink &= planted[0].mask(ink.shape)
    assert (after != image).any(axis=2)[ink].mean() >= 0.99
    assert not any("778812" in normalise(b.text or "") for b in engine.recognize(after))
    if shutil.which("tesseract"):
        assert found_strings(tesseract_text(after), planted) == []


@pytest.fixture
def no_torch_gpu() -> None:
    reason = cuda_unavailable("easyocr")
    if reason is None:
        pytest.skip("a CUDA GPU is present: device = 'cuda' is valid here")


@pytest.fixture
def torch_gpu() -> None:
    reason = cuda_unavailable("easyocr")
    if reason is not None:
        pytest.skip(f"no CUDA GPU: {reason}")


@pytest.fixture
def onnxruntime_gpu() -> None:
    reason = cuda_unavailable("rapidocr")
    if reason is not None:
        pytest.skip(f"RapidOCR cannot use a GPU here: {reason}")


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"pixels\.device: 'gpu' is not one of auto, cpu, cuda"):
        parse_config({"pixels": {"device": "gpu"}})


def test_rapidocr_on_cuda_without_a_usable_provider_fails_at_config_load() -> None:
    if cuda_unavailable("rapidocr") is None:
        pytest.skip("onnxruntime-gpu runs on a GPU here: device = 'cuda' is valid")
    with pytest.raises(ConfigError, match=r'pixels\.device = "cuda": ONNX Runtime'):
        parse_config({"pixels": {"ocr_engine": "rapidocr", "device": "cuda"}})
    # The engine itself refuses too, for a PixelsConfig built in code.
    with pytest.raises(ConfigError, match=r'pixels\.device = "cuda"'):
        get_engine("rapidocr", "cuda")


@pytest.mark.easyocr
def test_easyocr_on_cuda_without_a_gpu_fails_at_config_load(no_torch_gpu) -> None:
    with pytest.raises(ConfigError, match=r'pixels\.device = "cuda": torch sees no CUDA GPU'):
        parse_config({"pixels": {"ocr_engine": "easyocr", "device": "cuda"}})


@pytest.mark.ocr
def test_auto_and_cpu_run_rapidocr_where_they_can() -> None:
    auto = get_engine("rapidocr", "auto")
    assert auto.device == ("cuda" if cuda_unavailable("rapidocr") is None else "cpu")
    assert get_engine("rapidocr", "cpu").device == "cpu"


@pytest.mark.ocr
@pytest.mark.slow
@pytest.mark.easyocr
def test_easyocr_frames_in_one_call_read_each_frame() -> None:
    """recognize_frames: on a GPU one batched detector call, on the CPU one call per frame;
    either way each frame's own text, in its own place."""
    engine = get_engine("easyocr", "auto")
    assert engine.device == ("cuda" if cuda_unavailable("easyocr") is None else "cpu")
    first, planted_first = burned_in(2, (10, 30))
    second, planted_second = burned_in(3, (120, 200))
    boxes = recognize_frames(engine, [first, second])
    assert len(boxes) == 2
    for frame_boxes, planted in ((boxes[0], planted_first[0]), (boxes[1], planted_second[0])):
        hits = [b for b in frame_boxes if "778812" in normalise(b.text or "")]
        assert hits, frame_boxes
        assert all(abs(b.y - planted.y) < planted.h for b in hits)


@pytest.mark.ocr
@pytest.mark.slow
@pytest.mark.easyocr
def test_easyocr_batched_detector_reads_what_single_frames_read() -> None:
    """The GPU's batched path (readtext_batched), run here on whatever device there is: the
    same boxes and text as one frame at a time."""
    engine = get_engine("easyocr", "auto")
    frames = [burned_in(2, (10, 30))[0], burned_in(3, (120, 200))[0]]
    batched = engine.recognize_batch(frames, batched=True)
    single = engine.recognize_batch(frames, batched=False)
    assert [[(b.x, b.y, b.w, b.h, b.text) for b in f] for f in batched] == [
        [(b.x, b.y, b.w, b.h, b.text) for b in f] for f in single
    ]
    assert all(any("778812" in normalise(b.text or "") for b in f) for f in batched)


@pytest.mark.gpu
@pytest.mark.ocr
@pytest.mark.easyocr
def test_easyocr_runs_on_cuda_batched_and_redacts(torch_gpu) -> None:
    import torch

    engine = get_engine("easyocr", "cuda")
    assert engine.device == "cuda"
    assert parse_config({"pixels": {"ocr_engine": "easyocr", "device": "cuda"}}).pixels
    frames = [burned_in(seed, (10 + 15 * seed, 30 + 15 * seed)) for seed in range(10)]
    torch.cuda.reset_peak_memory_stats()
    batched = engine.recognize_batch([image for image, _ in frames])
    assert torch.cuda.max_memory_allocated() > 0  # the detector really ran on the GPU
    assert len(batched) == len(frames)
    for boxes in batched:
        assert any("778812" in normalise(b.text or "") for b in boxes), boxes
    assert_redacts(engine, PixelsConfig(ocr_engine="easyocr", device="cuda"))
    # CUDA is set up in this process now: the API would not fork workers from it.
    assert not fork_safe()


@pytest.mark.gpu
@pytest.mark.ocr
def test_rapidocr_runs_on_onnxruntime_cuda_and_redacts(onnxruntime_gpu) -> None:
    engine = get_engine("rapidocr", "cuda")
    assert engine.device == "cuda"
    assert_redacts(engine, PixelsConfig(ocr_engine="rapidocr", device="cuda"))


def slices(count: int = 3) -> tuple[np.ndarray, np.ndarray, list[list]]:
    """Frames that differ as wholes (each its own draw), the same without text, and the
    planted strings per frame."""
    drawn = [text_image(40 + i, H, W, clinical=False) for i in range(count)]
    blank = [text_image(40 + i, H, W, clinical=False, texts=())[0] for i in range(count)]
    return np.stack([d[0] for d in drawn]), np.stack(blank), [d[1] for d in drawn]


def scanned_boxes(frames: np.ndarray, engine) -> tuple[list, list[str]]:
    ds = cine_instance(frames)
    decoded = decode(ds)
    boxes, _, how = scan_frames(decoded, DisplayMapper(ds, decoded), engine, None, EASY_CUDA)
    return [[(b.x, b.y, b.w, b.h, b.text) for b in frame] for frame in boxes], how


@pytest.mark.ocr
@pytest.mark.slow
@pytest.mark.easyocr
def test_batched_frame_scan_finds_what_frame_by_frame_finds() -> None:
    """The pixel stage's batched path (deid/textscan.py; EasyOCR on CUDA takes it), run on the
    CPU with batches forced on: the same boxes in every frame as one frame at a time, for a cine
    whose text moves (its moving regions read in every frame, together) and for frames that
    differ as wholes (each read whole, together)."""
    from deid_node.ocr.easy import EasyOcrEngine

    one_by_one = get_engine("easyocr", "cpu")
    assert not one_by_one.batches
    batching = EasyOcrEngine("cpu", batches=True)
    moving, _ = cine_frames(2, 6, "moving", H, W)
    for frames in (moving, slices()[0]):
        batched, how = scanned_boxes(frames, batching)
        single, how_single = scanned_boxes(frames, one_by_one)
        assert batched == single
        assert how == how_single
        assert all(any(box[4] for box in frame) for frame in batched)  # text in every frame
    assert scanned_boxes(moving, batching)[1][0] == "cine_text_changes"


@pytest.mark.gpu
@pytest.mark.ocr
@pytest.mark.easyocr
@pytest.mark.parametrize("kind", ["static", "moving", "changing"])
def test_easyocr_on_cuda_blanks_every_string_of_a_cine_in_every_frame(torch_gpu, kind) -> None:
    frames, planted = cine_frames(3, 12, kind, H, W)
    blank, _ = cine_frames(3, 12, kind, H, W, blank=True)
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, EASY_CUDA)
    assert get_engine("easyocr", "cuda").batches
    assert outcome.changed and outcome.frames == 12
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)


@pytest.mark.gpu
@pytest.mark.ocr
@pytest.mark.easyocr
def test_easyocr_on_cuda_blanks_frames_that_differ_as_wholes(torch_gpu) -> None:
    frames, blank, planted = slices(4)
    ds = cine_instance(frames)
    outcome = redact_pixels(ds, Mode.REDACT_ALL_TEXT, EASY_CUDA)
    assert "cine_frames_differ" in outcome.reasons
    assert_every_string_gone(frames, blank, redacted_frames(ds), planted)


def _fresh_python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.easyocr
def test_cuda_start_up_check_leaves_this_process_without_cuda() -> None:
    """device = "cuda" is checked at start-up in a child process: the batch CLI and the API
    fork their workers after the check, and a worker forked from a process that has set up
    CUDA cannot use the GPU (every file would fail). Here: the check imports no torch in the
    process that asked (it used to import torch and call cudaGetDeviceCount there)."""
    code = (
        "import json, sys\n"
        "from deid_node.errors import ConfigError\n"
        "from deid_node.ocr import check_engine\n"
        "try:\n"
        "    check_engine('easyocr', 'cuda'); usable = True\n"
        "except ConfigError as exc:\n"
        "    usable = str(exc)\n"
        "print(json.dumps([usable, 'torch' in sys.modules]))\n"
    )
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    usable, torch_imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch_imported is False
    assert usable is True or usable.startswith('pixels.device = "cuda": torch sees no CUDA GPU')


@pytest.mark.gpu
@pytest.mark.ocr
@pytest.mark.easyocr
def test_batch_cli_workers_redact_on_the_gpu(torch_gpu, tmp_path) -> None:
    """`deid-node deidentify --workers 2` with device = "cuda": the parent checks the GPU, then
    forks its workers, and each worker loads EasyOCR on the GPU and blanks the burned-in text."""
    source = tmp_path / "in"
    source.mkdir()
    for seed in range(4):
        image, _ = burned_in(seed, (10 + 15 * seed, 30 + 15 * seed))
        make_instance("US", photometric="RGB", pixel_array=image).save_as(
            source / f"{seed}.dcm", enforce_file_format=True
        )
    config = tmp_path / "c.toml"
    config.write_text(
        '[deid]\nredact_pixels_mode = "REDACT_ALL_TEXT"\n'
        '[pixels]\nocr_engine = "easyocr"\ndevice = "cuda"\n'
    )
    report = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "deid_node.cli", "deidentify", "--workers", "2",
         "--config", str(config), "--data-dir", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--report", str(report), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    reports = json.loads(report.read_text())
    assert len(reports) == 4 and all(r["url_deid"] for r in reports), reports
    engine = get_engine("easyocr", "cuda")
    for r in reports:
        after = pydicom.dcmread(r["url_deid"]).pixel_array
        assert not any("778812" in normalise(b.text or "") for b in engine.recognize(after))


@pytest.mark.parametrize(
    ("interpreter", "why"),
    [
        ("/nonexistent/python3", "the CUDA check could not start a Python interpreter"),
        ("/bin/true", "the CUDA check failed (exit 0: no output)"),
        ("/bin/echo", "the CUDA check failed (exit 0: no output)"),
        ("/bin/false", "the CUDA check failed (exit 1"),
    ],
)
def test_a_cuda_check_without_an_answer_refuses_cuda(monkeypatch, interpreter, why) -> None:
    """No answer from the child (no interpreter there, one that prints something else or
    nothing) is a reason to refuse device = "cuda", with a clear config error, never a pass."""
    if not shutil.which(interpreter) and not interpreter.startswith("/nonexistent"):
        pytest.skip(f"{interpreter} is not on this machine")
    monkeypatch.setattr(sys, "executable", interpreter)
    with pytest.raises(ConfigError, match=r'pixels\.device = "cuda": ' + re.escape(why)):
        parse_config({"pixels": {"ocr_engine": "rapidocr", "device": "cuda"}})


def test_api_workers_start_clean_once_cuda_is_set_up_in_this_process(monkeypatch) -> None:
    """The Python API forks its workers (fast: they start from this process's imports), except
    once CUDA is set up here (an earlier inline run read on the GPU): forked workers could not
    use it, so they start from a forkserver. Both kinds of pool run a job."""
    import os

    from deid_node import api, ocr

    torch = sys.modules.get("torch")
    set_up_by_torch = torch is not None and torch.cuda.is_initialized()
    monkeypatch.setattr(ocr, "_cuda_set_up", False)
    with api.worker_pool(2) as pool:
        assert pool.start_method == ("forkserver" if set_up_by_torch else "fork")
        assert pool.submit(os.getpid).result(timeout=60) != os.getpid()
    monkeypatch.setattr(ocr, "_cuda_set_up", True)
    assert not ocr.fork_safe()
    with api.worker_pool(2) as pool:
        assert pool.start_method == "forkserver"
        assert pool.submit(os.getpid).result(timeout=60) != os.getpid()
