"""The Python API, with the names of Encord's SDK so that its examples port by changing the import.

reports = deidentify_dicom_files(dicom_urls=paths, redact_dicom_tags=True,
    redact_pixels_mode=DeidentifyRedactTextMode.REDACT_ALL_TEXT,
    save_conditions=criteria, upload_dir="out/")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from deid_node.batch import run_batch
from deid_node.conditions import SaveDeidentifiedDicomCondition
from deid_node.config import Config, DeidConfig, PixelsConfig
from deid_node.errors import ConfigError
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
from deid_node.pipeline import PipelineSettings
from deid_node.workers import RenewablePool

DEFAULT_DATA_DIR = Path("var")


def deidentify_dicom_files(
    dicom_urls: Sequence[str | os.PathLike[str]],
    redact_dicom_tags: bool = True,
    redact_pixels_mode: DeidentifyRedactTextMode | str = DeidentifyRedactTextMode.REDACT_NO_TEXT,
    save_conditions: Sequence[SaveDeidentifiedDicomCondition] | None = None,
    upload_dir: str | os.PathLike[str] | None = None,
    *,
    config: Config | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    policy: SeriesPolicy | str = SeriesPolicy.ALL,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """De-identify local DICOM files (paths or file:// URLs) into `upload_dir`.

    Returns one report per input DICOM file (Encord's keys). Series are judged as a whole.
    `data_dir` holds the installation secret that makes UIDs and pseudonyms consistent with the
    node's (default: the config's data_dir, else ./var).
    """
    if upload_dir is None:
        raise ConfigError("upload_dir is required: results must land in a local folder")
    if isinstance(dicom_urls, str | os.PathLike):
        dicom_urls = [dicom_urls]
    deid = config.deid if config else DeidConfig()
    deid = replace(
        deid,
        redact_dicom_tags=redact_dicom_tags,
        redact_pixels_mode=DeidentifyRedactTextMode(str(redact_pixels_mode)),
    )
    settings = build_settings(
        deid=deid,
        pixels=config.pixels if config else PixelsConfig(),
        conditions=tuple(save_conditions or ()),
        policy=SeriesPolicy(str(policy)),
        data_dir=Path(data_dir)
        if data_dir
        else (config.node.data_dir if config else DEFAULT_DATA_DIR),
    )
    with worker_pool(workers) as executor:
        result = run_batch(
            dicom_urls, Path(upload_dir), settings, executor=executor, progress=False
        )
    return result.reports


def build_settings(
    *,
    deid: DeidConfig,
    pixels: PixelsConfig,
    conditions: tuple[SaveDeidentifiedDicomCondition, ...],
    policy: SeriesPolicy,
    data_dir: Path,
    secret_name: str = "default",
) -> PipelineSettings:
    """The pipeline's settings for a batch run; `secret_name`: a project's secret (the
    installation secret by default), so that the run derives the node's UIDs for it."""
    from deid_node.deid.uids import load_or_create_secret
    from deid_node.ocr import check_engine

    # Before any file: EasyOCR without its extra, or device "cuda" without a GPU, fails here.
    check_engine(pixels.ocr_engine, pixels.device)
    return PipelineSettings(
        deid,
        pixels,
        conditions,
        policy,
        load_or_create_secret(data_dir.absolute(), secret_name),
        durable=False,
    )


class worker_pool:  # noqa: N801 - used as a context manager, reads like one
    """A process pool for `workers > 1`, or None (inline) for one worker. A worker that dies
    under a run gets the rest of the run a fresh pool of as many workers (RenewablePool)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: Any = None

    def __enter__(self) -> Any:
        if self.workers > 1:
            from deid_node.ocr import fork_safe

            # fork: the workers start from this process's imports. Not once CUDA is set up
            # here (an earlier inline run that read on the GPU): forked workers could not use
            # it, and every file would fail; forkserver's workers start clean.
            method = "fork" if fork_safe() else "forkserver"
            self.pool = RenewablePool(self.workers, start_method=method)
        return self.pool

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
