"""OCR engines behind one protocol: `get_engine(name, device)`, one load per process and device,
and the start-up check that an engine can run here (`check_engine`).

Engine modules import their heavy dependencies (onnxruntime, torch) only when first built.
EasyOCR and torch are an optional extra (`pip install 'deid-node[easyocr]'`): the base install
has RapidOCR only, and selecting EasyOCR without the extra fails at start-up, not at the first
image.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from deid_node.errors import ConfigError
from deid_node.modes import OCR_ENGINES
from deid_node.ocr.base import OcrEngine, TextBox

__all__ = [
    "DEVICES",
    "EASYOCR_EXTRA",
    "ENGINES",
    "OcrEngine",
    "TextBox",
    "check_engine",
    "cuda_unavailable",
    "fork_safe",
    "get_engine",
    "recognize_frames",
    "resolve_device",
]

ENGINES = OCR_ENGINES
DEVICES = ("auto", "cpu", "cuda")
EASYOCR_EXTRA = "pip install 'deid-node[easyocr]'"

# The top-level modules each engine imports; found (not imported) by check_engine.
_ENGINE_MODULES = {
    "rapidocr": ("rapidocr_onnxruntime", "onnxruntime"),
    "easyocr": ("easyocr", "easyocr_en_models", "torch"),
}
_CUDA_EP = "CUDAExecutionProvider"

_engines: dict[tuple[str, str], OcrEngine] = {}
_lock = threading.Lock()


def get_engine(name: str, device: str = "auto") -> OcrEngine:
    """The process-wide engine called `name` on `device`, built (models loaded) on first use."""
    with _lock:
        engine = _engines.get((name, device))
        if engine is None:
            engine = _build(name, device)
            _engines[(name, device)] = engine
        return engine


def check_engine(name: str, device: str = "auto", where: str = "pixels") -> None:
    """Raise ConfigError, naming what to install or change, when engine `name` cannot run here:
    its packages are missing (EasyOCR without the extra), or device = "cuda" and it would not
    run on a GPU. Cheap for device auto/cpu (modules are found, not imported); with "cuda" a
    short-lived child process imports torch (EasyOCR) or starts one ONNX Runtime session
    (RapidOCR) and says whether the GPU works (_cuda_unavailable_apart). `where` names the
    config section in the message."""
    _check_installed(name, device, where)
    if device == "cuda":
        reason = _cuda_unavailable_apart(name)
        if reason is not None:
            raise ConfigError(f'{where}.device = "cuda": {reason}; or set device = "auto" or "cpu"')


def _check_installed(name: str, device: str, where: str = "pixels") -> None:
    if name not in ENGINES:
        raise ConfigError(
            f"{where}.ocr_engine: unknown OCR engine {name!r}; known: {', '.join(ENGINES)}"
        )
    if device not in DEVICES:
        raise ConfigError(f"{where}.device: {device!r} is not one of {', '.join(DEVICES)}")
    missing = [m for m in _ENGINE_MODULES[name] if importlib.util.find_spec(m) is None]
    if missing and name == "easyocr":
        raise ConfigError(
            f'{where}.ocr_engine = "easyocr" needs the easyocr extra (EasyOCR, torch and its '
            f"English models; not installed here: {', '.join(missing)}): "
            f'{EASYOCR_EXTRA} (or make run EXTRAS=easyocr), or use ocr_engine = "rapidocr"'
        )
    if missing:
        raise ConfigError(
            f"{where}.ocr_engine = {name!r}: {', '.join(missing)} not installed; "
            "reinstall deid-node (pip install deid-node)"
        )


# Set once this process has set CUDA up (a check that found a working GPU, an engine on it):
# a child forked from it from then on cannot use CUDA (fork_safe).
_cuda_set_up = False


def cuda_unavailable(name: str) -> str | None:
    """Why engine `name` cannot run on a CUDA GPU in this process, or None when it can. Where
    it can, CUDA is now set up in this process (see fork_safe)."""
    global _cuda_set_up
    if name == "easyocr":
        import torch  # the easyocr extra

        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU (torch.cuda.is_available() is False) for EasyOCR"
        _cuda_set_up = True
        return None
    reason = _onnxruntime_cuda_unavailable()
    _cuda_set_up = _cuda_set_up or reason is None
    return reason


def fork_safe() -> bool:
    """Whether workers forked from this process can use CUDA: not once CUDA is set up here (an
    engine built on the GPU by an inline run, a check that found the GPU working; PyTorch:
    "Cannot re-initialize CUDA in forked subprocess"). The Python API then starts its workers
    with forkserver instead of fork."""
    if _cuda_set_up:
        return False
    torch = sys.modules.get("torch")  # set up by the caller's own code, not ours
    return torch is None or not torch.cuda.is_initialized()


# A spawned interpreter importing torch takes a few seconds; a hung driver must not hang start-up.
_CUDA_CHECK_TIMEOUT_S = 300


_CHECK_ANSWER = "deid-node-cuda-check:"


def _cuda_unavailable_apart(name: str) -> str | None:
    """cuda_unavailable(name), asked in a child process of its own. Asking here would set up
    CUDA in this process (torch's cudaGetDeviceCount, an ONNX Runtime CUDA session), and the
    batch CLI and the API fork their workers after this check: a forked child cannot use CUDA
    once its parent has (PyTorch: "Cannot re-initialize CUDA in forked subprocess"), so every
    worker would fail its files on a machine whose GPU works. The child answers on one marked
    line (what else an import prints is ignored); no answer is a reason, never a pass."""
    # The child imports this very package, installed or not (a checkout): its folder is put
    # last on the child's path, never ahead of the standard library.
    root = str(Path(__file__).resolve().parents[2])
    code = (
        "import json, sys; sys.path.append(sys.argv[2]); "
        "from deid_node.ocr import cuda_unavailable; "
        f"print({_CHECK_ANSWER!r} + json.dumps(cuda_unavailable(sys.argv[1])))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, name, root],
            capture_output=True,
            text=True,
            timeout=_CUDA_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"the CUDA check did not answer within {_CUDA_CHECK_TIMEOUT_S} s"
    except OSError as exc:  # no usable interpreter at sys.executable
        return f"the CUDA check could not start a Python interpreter ({type(exc).__name__})"
    answers = [
        line[len(_CHECK_ANSWER) :]
        for line in done.stdout.splitlines()
        if line.startswith(_CHECK_ANSWER)
    ]
    if done.returncode != 0 or not answers:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return f"the CUDA check failed (exit {done.returncode}: {last})"
    try:
        reason = json.loads(answers[-1])
    except ValueError:
        return "the CUDA check gave an unreadable answer"
    return None if reason is None else str(reason)


def resolve_device(name: str, device: str) -> Literal["cpu", "cuda"]:
    """The device engine `name` runs on: "auto" is CUDA when it is usable here, else the CPU."""
    if device == "cpu":
        return "cpu"
    reason = cuda_unavailable(name)
    if reason is None:
        return "cuda"
    if device == "cuda":
        raise ConfigError(f'pixels.device = "cuda": {reason}; or set device = "auto" or "cpu"')
    return "cpu"


def recognize_frames(engine: OcrEngine, images: Sequence[np.ndarray]) -> list[list[TextBox]]:
    """`engine.recognize` of each image, in batched calls where the engine has them (EasyOCR on
    CUDA: same-sized frames go through the detector together)."""
    batched = getattr(engine, "recognize_batch", None)
    if batched is not None:
        return batched(images)
    return [engine.recognize(image) for image in images]


def _build(name: str, device: str) -> OcrEngine:
    _check_installed(name, device)
    on = resolve_device(name, device)  # raises for "cuda" without a usable GPU
    if name == "rapidocr":
        from deid_node.ocr.rapid import RapidOcrEngine

        return RapidOcrEngine(use_cuda=on == "cuda")
    from deid_node.ocr.easy import EasyOcrEngine

    return EasyOcrEngine(device=on)


def _onnxruntime_cuda_unavailable() -> str | None:
    """None when ONNX Runtime has a CUDA provider that starts a session on a GPU here."""
    import onnxruntime

    if _CUDA_EP not in onnxruntime.get_available_providers():
        return (
            "ONNX Runtime has no CUDAExecutionProvider for RapidOCR: replace onnxruntime by "
            "onnxruntime-gpu (README, GPU)"
        )
    # The provider is compiled in; whether a GPU and its libraries are there shows only when a
    # session starts: ONNX Runtime falls back to the CPU instead of failing.
    model = _rapidocr_detector_model()
    try:
        session = onnxruntime.InferenceSession(str(model), providers=[_CUDA_EP])
    except Exception as exc:  # any failure means: not on a GPU here
        return f"ONNX Runtime's CUDA provider did not start ({type(exc).__name__})"
    if session.get_providers()[:1] != [_CUDA_EP]:
        return "ONNX Runtime's CUDA provider did not start (no GPU, or CUDA/cuDNN missing)"
    return None


def _rapidocr_detector_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise ConfigError("pixels.ocr_engine: rapidocr_onnxruntime is not installed")
    models = sorted((Path(spec.origin).parent / "models").glob("*det*.onnx"))
    if not models:
        raise ConfigError("pixels.ocr_engine: RapidOCR's detection model is missing")
    return models[0]
