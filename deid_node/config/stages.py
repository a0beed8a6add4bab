"""The sections a project may override: [series], [deid], [pixels] and save_conditions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deid_node.conditions import SaveDeidentifiedDicomCondition, parse_conditions
from deid_node.config.model import (
    OCR_ENGINES,
    PROFILE_OPTIONS,
    DeidConfig,
    PixelsConfig,
    RegionTemplate,
    SeriesConfig,
)
from deid_node.config.tables import reject_unknown, replace, section
from deid_node.errors import ConditionError, ConfigError


def parse_series(raw: Any, label: str) -> SeriesConfig:
    series = section(SeriesConfig, raw, label)
    if series.stable_seconds < 0:
        raise ConfigError(f"{label}.stable_seconds: must be >= 0")
    return series


def parse_deid(raw: Any, label: str) -> DeidConfig:
    deid = section(DeidConfig, raw, label)
    for option in deid.profile_options:
        if option not in PROFILE_OPTIONS:
            raise ConfigError(
                f"{label}.profile_options: unknown option {option!r};"
                f" known: {', '.join(PROFILE_OPTIONS)}"
            )
    if {PROFILE_OPTIONS[5], PROFILE_OPTIONS[6]} <= set(deid.profile_options):
        raise ConfigError(f"{label}.profile_options: choose Full Dates or Modified Dates, not both")
    if deid.encapsulated_documents not in ("quarantine", "remove"):
        raise ConfigError(
            f"{label}.encapsulated_documents: {deid.encapsulated_documents!r} is not one of "
            "quarantine, remove"
        )
    if len(deid.patient_id_prefix) > 48 or "\\" in deid.patient_id_prefix:
        raise ConfigError(f"{label}.patient_id_prefix: at most 48 characters, no backslash")
    if deid.lookup_table is not None:
        deid = replace(deid, lookup_table=Path(deid.lookup_table).absolute())
    return deid


def parse_pixels(raw: Any, where: str = "pixels") -> PixelsConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    templates_raw = raw.get("templates", [])
    rest = {k: v for k, v in raw.items() if k != "templates"}
    pixels = section(PixelsConfig, rest, where)
    if pixels.ocr_engine not in OCR_ENGINES:
        raise ConfigError(f"{where}.ocr_engine: must be one of {', '.join(OCR_ENGINES)}")
    from deid_node.ocr import check_engine  # numpy only; engines are found, not imported

    # At start-up, not at the first image: EasyOCR without its extra, device "cuda" without a GPU.
    check_engine(pixels.ocr_engine, pixels.device, where)
    fraction = pixels.max_redacted_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ConfigError(f"{where}.max_redacted_fraction: expected a number in (0, 1], e.g. 0.05")
    pixels = replace(pixels, max_redacted_fraction=float(fraction))
    templates = []
    for index, entry in enumerate(templates_raw):
        label = f"{where}.templates[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{label}: expected a table")
        reject_unknown(entry, {"manufacturer", "model", "rows", "columns", "regions"}, label)
        regions = entry.get("regions", [])
        if not regions or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and v >= 0 for v in r)
            for r in regions
        ):
            raise ConfigError(f"{label}.regions: expected a list of [x, y, width, height] integers")
        templates.append(
            RegionTemplate(
                manufacturer=str(entry.get("manufacturer", "")),
                model=str(entry.get("model", "")),
                rows=entry.get("rows"),
                columns=entry.get("columns"),
                regions=tuple(tuple(r) for r in regions),
            )
        )
    return replace(pixels, templates=tuple(templates))


def parse_condition_list(raw: list[Any], label: str) -> tuple[SaveDeidentifiedDicomCondition, ...]:
    try:
        return tuple(parse_conditions(raw, label))
    except ConditionError as exc:
        raise ConfigError(str(exc)) from None
