"""[[projects]]: routing keys (called and calling AE titles, match), destinations, secret, and
the sections each project inherits from the top level and may override."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from deid_node.config.model import Config, ProjectConfig
from deid_node.config.stages import (
    parse_condition_list,
    parse_deid,
    parse_pixels,
    parse_series,
)
from deid_node.config.tables import as_list, coerce, reject_unknown
from deid_node.errors import ConfigError

_PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def _inherited(raw: Mapping[str, Any], entry: Mapping[str, Any], key: str, label: str) -> dict:
    """A project's section: the top-level table with the project's keys over it."""
    top, own = raw.get(key, {}), entry.get(key, {})
    for table, name in ((top, key), (own, f"{label}.{key}")):
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table")
    return {**top, **own}


def parse_project(entry: Any, index: int, raw: Mapping[str, Any], config: Config) -> ProjectConfig:
    label = f"projects[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    reject_unknown(
        entry,
        {
            "name",
            "called_ae_titles",
            "calling_ae_titles",
            "destinations",
            "match",
            "series",
            "deid",
            "pixels",
            "save_conditions",
            "secret_name",
        },
        label,
    )
    name = entry.get("name")
    if not isinstance(name, str) or not _PROJECT_NAME.match(name):
        raise ConfigError(f"{label}.name: required, 1-64 characters of a-z, 0-9 and -")
    titles = {}
    for key, default in (
        ("called_ae_titles", [config.node.ae_title]),
        ("calling_ae_titles", []),
    ):
        values = coerce(entry.get(key, default), "tuple[str, ...]", f"{label}.{key}")
        for title in values:
            if not title.strip() or len(title.strip()) > 16 or not title.isascii() or "\\" in title:
                raise ConfigError(f"{label}.{key}: {title!r} is not an AE title (1-16 ASCII)")
        titles[key] = tuple(t.strip() for t in values)
    if not titles["called_ae_titles"]:
        raise ConfigError(f"{label}.called_ae_titles: at least one AE title")
    if "destinations" not in entry:
        raise ConfigError(f"{label}.destinations: required (names of [[destinations]])")
    destinations = coerce(entry["destinations"], "tuple[str, ...]", f"{label}.destinations")
    known = {d.name for d in config.destinations}
    for dest in destinations:
        if dest not in known:
            raise ConfigError(
                f"{label}.destinations: no destination named {dest!r}"
                f" (known: {', '.join(sorted(known)) or 'none'})"
            )
    secret_name = entry.get("secret_name", "")
    if secret_name and (not isinstance(secret_name, str) or not _PROJECT_NAME.match(secret_name)):
        raise ConfigError(f"{label}.secret_name: 1-64 characters of a-z, 0-9 and -")
    if not isinstance(entry.get("match", []), list):
        raise ConfigError(f"{label}.match: expected an array of conditions")
    own_conditions = as_list(entry, "save_conditions") if "save_conditions" in entry else []
    return ProjectConfig(
        name=name,
        called_ae_titles=titles["called_ae_titles"],
        calling_ae_titles=titles["calling_ae_titles"],
        destinations=destinations,
        match=parse_condition_list(entry.get("match", []), f"{label}.match"),
        series=parse_series(_inherited(raw, entry, "series", label), f"{label}.series"),
        deid=parse_deid(_inherited(raw, entry, "deid", label), f"{label}.deid"),
        pixels=parse_pixels(_inherited(raw, entry, "pixels", label), f"{label}.pixels"),
        save_conditions=(
            parse_condition_list(own_conditions, f"{label}.save_conditions")
            if own_conditions
            else config.save_conditions
        ),
        secret_name=secret_name,
    )
