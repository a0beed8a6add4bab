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
from deid_node.config.node import parse_console, parse_node, parse_store
from deid_node.config.peers import parse_destination, parse_source
from deid_node.config.projects import parse_project
from deid_node.config.stages import (
    parse_condition_list,
    parse_deid,
    parse_pixels,
    parse_series,
)
from deid_node.config.tables import as_list, reject_unknown, replace
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
    reject_unknown(
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
    node = parse_node(raw)
    store = parse_store(raw.get("store", {}))

    series = parse_series(raw.get("series", {}), "series")
    deid = parse_deid(raw.get("deid", {}), "deid")
    pixels = parse_pixels(raw.get("pixels", {}))
    conditions = parse_condition_list(as_list(raw, "save_conditions"), "save_conditions")

    destinations = tuple(
        parse_destination(entry, index, node)
        for index, entry in enumerate(as_list(raw, "destinations"))
    )
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError("destinations: names must be unique")
    console = parse_console(raw.get("console", {}))
    sources = tuple(
        parse_source(entry, index) for index, entry in enumerate(as_list(raw, "sources"))
    )
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError("sources: names must be unique")
    config = Config(
        node, series, deid, pixels, conditions, destinations, source, console, sources=sources
    )
    projects = tuple(
        parse_project(entry, index, raw, config)
        for index, entry in enumerate(as_list(raw, "projects"))
    )
    if len({p.name for p in projects}) != len(projects):
        raise ConfigError("projects: names must be unique")
    return replace(config, projects=projects, store=store)


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
