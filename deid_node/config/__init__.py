"""Configuration: TOML -> frozen dataclasses, validated once at start-up.

Every error names the offending key (`node.port`, `destinations[0].host`, ...). Relative paths
(data_dir, folder destinations, lookup tables) resolve against the working directory of the
process, and are made absolute here so that the rest of the code never depends on it.

- model.py: the dataclasses, one a section, and the option names they accept;
- tables.py: a TOML table -> a dataclass (types coerced, unknown keys named);
- node.py: [node] (limits, allowed peers, TLS, replica_id), [store] and [console];
- stages.py: [series], [deid], [pixels] and save_conditions (a project may override them);
- peers.py: [[destinations]] and [[sources]];
- projects.py: [[projects]], their routing keys and the sections they inherit.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deid_node.config.model import (
    OCR_ENGINES,
    PROFILE_OPTIONS,
    Config,
    ConsoleConfig,
    DeidConfig,
    DestinationConfig,
    NodeConfig,
    PixelsConfig,
    ProjectConfig,
    RegionTemplate,
    SeriesConfig,
    SourceConfig,
    StoreConfig,
    TlsConfig,
)
from deid_node.config.node import _parse_console, _parse_node, _parse_store
from deid_node.config.peers import _parse_destination, _parse_source
from deid_node.config.projects import _parse_project
from deid_node.config.stages import (
    _parse_condition_list,
    _parse_deid,
    _parse_pixels,
    _parse_series,
)
from deid_node.config.tables import _list, _reject_unknown, _replace
from deid_node.errors import ConfigError


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError naming the bad key."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(raw, source=source)


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    _reject_unknown(
        raw,
        {
            "node",
            "series",
            "deid",
            "pixels",
            "save_conditions",
            "destinations",
            "console",
            "sources",
            "projects",
            "store",
        },
        "",
    )
    node = _parse_node(raw)
    store = _parse_store(raw.get("store", {}))

    series = _parse_series(raw.get("series", {}), "series")
    deid = _parse_deid(raw.get("deid", {}), "deid")
    pixels = _parse_pixels(raw.get("pixels", {}))
    conditions = _parse_condition_list(_list(raw, "save_conditions"), "save_conditions")

    destinations = tuple(
        _parse_destination(entry, index, node)
        for index, entry in enumerate(_list(raw, "destinations"))
    )
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError("destinations: names must be unique")
    console = _parse_console(raw.get("console", {}))
    sources = tuple(
        _parse_source(entry, index) for index, entry in enumerate(_list(raw, "sources"))
    )
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError("sources: names must be unique")
    config = Config(
        node, series, deid, pixels, conditions, destinations, source, console, sources=sources
    )
    projects = tuple(
        _parse_project(entry, index, raw, config)
        for index, entry in enumerate(_list(raw, "projects"))
    )
    if len({p.name for p in projects}) != len(projects):
        raise ConfigError("projects: names must be unique")
    return _replace(config, projects=projects, store=store)


__all__ = [
    "OCR_ENGINES",
    "PROFILE_OPTIONS",
    "Config",
    "ConsoleConfig",
    "DeidConfig",
    "DestinationConfig",
    "NodeConfig",
    "PixelsConfig",
    "ProjectConfig",
    "RegionTemplate",
    "SeriesConfig",
    "SourceConfig",
    "StoreConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
]
