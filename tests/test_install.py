"""The light default install: the base package, alone in a fresh venv, has no torch, de-identifies
a burned-in image with RapidOCR, and refuses ocr_engine = "easyocr" at start-up naming the extra.

The venv is real: our wheel plus pyproject's base dependencies, resolved by pip, nothing of the
test's own environment. The dependencies' wheels are downloaded once into a wheelhouse under
this environment's prefix (keyed on the dependency list), so later runs install offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomgen import make_instance
from peers import free_port
from textimages import blank_image, draw_text, found_strings, tesseract_text

from deid_node.ocr import EASYOCR_EXTRA

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")
PIP_TIMEOUT = 300  # seconds; a first download from PyPI, or an install of ~40 wheels
RUN_TIMEOUT = 180

pytestmark = [pytest.mark.slow, pytest.mark.ocr]


def _pip(*args: str, timeout: int = PIP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
    )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _base_dependencies() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def _wheelhouse(deps: list[str]) -> Path:
    """Wheels of the base dependencies, downloaded once per dependency list."""
    key = hashlib.sha256("\n".join(sorted(deps)).encode()).hexdigest()[:16]
    house = Path(sys.prefix) / "deid-node-test-wheels" / key
    if (house / ".complete").exists():
        return house
    partial = house.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    done = _pip("download", "--quiet", "--dest", str(partial), *deps)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        reason = f"cannot download the base dependencies: {done.stderr[-800:]}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    (partial / ".complete").touch()
    shutil.rmtree(house, ignore_errors=True)
    partial.rename(house)
    return house


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding our wheel and the base dependencies only; its bin/ folder."""
    root = tmp_path_factory.mktemp("install")
    # Our wheel, built from a copy: the shared working tree gets no build/ or egg-info.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "deid_node", src / "deid_node", ignore=shutil.ignore_patterns("__pycache__")
    )
    # Without build isolation when setuptools is here (make test's venv): nothing to download.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = _pip("wheel", "--quiet", "--no-deps", *isolation, "-w", str(root / "dist"), str(src))
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("deid_node-*.whl")
    house = _wheelhouse(_base_dependencies())
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=RUN_TIMEOUT,
        env=_clean_env(),
    )
    python = venv / "bin" / "python"
    # Only the wheelhouse and our wheel: pip resolves the base dependencies, offline.
    installed = _pip(
        "--python", str(python), "install", "--quiet", "--no-compile", "--no-index",
        "--find-links", str(house), str(wheel),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = _clean_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=cwd,
        env=env,
    )


def test_base_venv_has_no_torch_and_is_not_the_test_environment(base_venv: Path, tmp_path):
    probe = (
        "import importlib.util as u, deid_node, rapidocr_onnxruntime; "
        "print(deid_node.__file__); "
        "print(sorted(m for m in ('torch', 'torchvision', 'easyocr', 'easyocr_en_models') "
        "if u.find_spec(m)))"
    )
    done = _run(base_venv, "python", "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, heavy = done.stdout.splitlines()
    assert Path(where).is_relative_to(base_venv.parent), where  # not the working tree
    assert heavy == "[]"
    no_torch = _run(base_venv, "python", "-c", "import torch", cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def test_base_venv_redacts_burned_in_text_with_rapidocr(base_venv: Path, tmp_path):
    image = np.repeat(blank_image(2, 240, 320)[:, :, None], 3, axis=2)
    planted = [draw_text(image, "PIDQX778812", (10, 30), scale=0.8)]
    assert found_strings(tesseract_text(image), planted) == ["PIDQX778812"]  # readable before
    source = tmp_path / "in"
    source.mkdir()
    make_instance("US", photometric="RGB", pixel_array=image).save_as(
        source / "us.dcm", enforce_file_format=True
    )
    out, report = tmp_path / "out", tmp_path / "report.json"
    done = _run(
        base_venv, "deid-node", "deidentify", str(source), "--out", str(out),
        "--report", str(report), "--redact-pixels-mode", "REDACT_ALL_TEXT",
        "--workers", "1", "--data-dir", str(tmp_path / "var"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = out.rglob("*.dcm")
    pixels = pydicom.dcmread(written).pixel_array
    assert not np.array_equal(pixels, image)
    assert found_strings(tesseract_text(pixels), planted) == []
    assert '"rapidocr"' in report.read_text()  # the report names the engine that ran


def test_easyocr_without_the_extra_fails_at_start_up_naming_it(base_venv: Path, tmp_path):
    config = tmp_path / "easy.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\nport = {free_port()}\n'
        '[pixels]\nocr_engine = "easyocr"\n'
        f'[[destinations]]\nname = "out"\ntype = "folder"\npath = "{tmp_path / "dest"}"\n'
    )
    source = tmp_path / "in"
    source.mkdir()
    make_instance("CT").save_as(source / "ct.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    runs = {
        "check-config": ("deid-node", "check-config", "--config", str(config)),
        "serve": ("deid-node", "serve", "--config", str(config)),
        "deidentify": (
            "deid-node", "deidentify", str(source), "--out", str(out), "--config", str(config),
            "--report", str(tmp_path / "report.json"), "--workers", "1",
        ),
    }  # fmt: skip
    for command, args in runs.items():
        done = _run(base_venv, *args, cwd=tmp_path)
        assert done.returncode != 0, command
        assert EASYOCR_EXTRA in done.stderr, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, command
    # Nothing was received, written or reported before the refusal.
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / "dest").exists()


def test_easyocr_marker_skips_without_the_extra_and_fails_under_ci(tmp_path):
    """The guard that keeps EasyOCR's tests honest: run a marked test where easyocr cannot be
    found (None in sys.modules hides it), once as a developer and once as CI."""
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n@pytest.mark.easyocr\ndef test_needs_easyocr():\n    pass\n"
    )
    runner = (
        "import sys\n"
        "sys.modules['easyocr'] = None  # find_spec answers None, import raises\n"
        "import pytest\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "sys.exit(pytest.main(['-q', '-p', 'extras', '-p', 'no:cacheprovider', "
        f"'--rootdir', {str(tmp_path)!r}, {str(tmp_path / 'test_marked.py')!r}]))\n"
    )
    results = {}
    for ci in ("", "true"):
        env = _clean_env()
        env["CI"] = ci
        results[ci] = subprocess.run(
            [sys.executable, "-c", runner],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
            env=env,
        )
    assert results[""].returncode == 0, results[""].stdout
    assert "1 skipped" in results[""].stdout
    assert results["true"].returncode == 1, results["true"].stdout
    assert "under CI=true every extra must be installed" in results["true"].stdout
