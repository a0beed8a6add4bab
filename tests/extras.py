"""Tests that need an optional extra: the `easyocr` marker, a pytest plugin (loaded by conftest).

Without the extra such a test is skipped, except under CI=true: `make test` installs every
extra, so there a missing engine is a broken install and fails the test instead of hiding it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

EASYOCR_MODULES = ("easyocr", "easyocr_en_models", "torch")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "easyocr: needs the easyocr extra (skipped without it; a failure under CI=true)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("easyocr") is None:
        return
    missing = [m for m in EASYOCR_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = (
        f"easyocr extra not installed ({', '.join(missing)}): pip install 'deid-node[easyocr]'"
    )
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"{message}; under CI=true every extra must be installed", pytrace=False)
    pytest.skip(message)
