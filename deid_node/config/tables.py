"""TOML tables -> dataclasses: coercion to the annotated types, unknown keys, ports."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from deid_node.errors import ConfigError
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy


def section(cls: type, raw: Any, label: str) -> Any:
    """Build a dataclass from a TOML table, coercing to the annotated types; name bad keys."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a table")
    known = {f.name: f for f in fields(cls) if f.init}
    reject_unknown(raw, set(known), label)
    values = {}
    for key, value in raw.items():
        values[key] = coerce(value, known[key].type, f"{label}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """A TOML value as the annotated type; ConfigError naming `key` when it is not one."""
    kind = str(annotation)
    try:
        if kind.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}: expected a list of strings")
            return tuple(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}: expected an integer")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{key}: expected a number")
            return float(value)
        if "Path" in kind:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key}: expected a path")
            return Path(value)
        if kind == "SeriesPolicy":
            return SeriesPolicy(value)
        if kind == "DeidentifyRedactTextMode":
            return DeidentifyRedactTextMode(str(value).upper())
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return value
    except ValueError:
        choices = {
            "SeriesPolicy": [p.value for p in SeriesPolicy],
            "DeidentifyRedactTextMode": [m.value for m in DeidentifyRedactTextMode],
        }.get(kind, [])
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}") from None


def reject_unknown(raw: Mapping[str, Any], known: set[str], label: str) -> None:
    """ConfigError naming the first key of `raw` not in `known`, and the known keys."""
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{label}." if label else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")


def as_list(raw: Mapping[str, Any], key: str) -> list[Any]:
    """An array of tables (`[[key]]`), empty when absent."""
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
    return value


def check_port(port: int, key: str) -> None:
    """ConfigError naming `key` unless the port is 1-65535."""
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: must be 1-65535")


def replace(obj: Any, **changes: Any) -> Any:
    """A frozen section with some fields changed (dataclasses.replace)."""
    return dataclasses.replace(obj, **changes)
