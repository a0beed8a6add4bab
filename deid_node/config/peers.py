"""[[destinations]] (C-STORE, folder, DICOMweb STOW-RS) and [[sources]] (PACS to pull from)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deid_node.config.model import DestinationConfig, NodeConfig, SourceConfig
from deid_node.config.tables import check_port, replace, section
from deid_node.errors import ConfigError


def parse_destination(entry: Any, index: int, node: NodeConfig) -> DestinationConfig:
    label = f"destinations[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    for key in ("name", "type"):
        if key not in entry:
            raise ConfigError(f"{label}.{key}: required")
    if "base_url" in entry:
        raise ConfigError(f"{label}.base_url: unknown key (the base URL is `url`)")
    if not isinstance(entry.get("url", ""), str):
        raise ConfigError(f"{label}.url: expected a string")
    entry = {("base_url" if k == "url" else k): v for k, v in entry.items()}
    dest = section(DestinationConfig, entry, label)
    if dest.type == "dicomweb":
        dest = _check_dicomweb(dest, label)
    elif dest.type == "dicom":
        if not dest.ae_title or len(dest.ae_title) > 16:
            raise ConfigError(
                f"{label}.ae_title: required for a dicom destination, 1-16 characters"
            )
        if not dest.host:
            raise ConfigError(f"{label}.host: required for a dicom destination")
        check_port(dest.port, f"{label}.port")
        if not dest.calling_ae_title:
            dest = replace(dest, calling_ae_title=node.ae_title)
    elif dest.type == "folder":
        if dest.path is None:
            raise ConfigError(f"{label}.path: required for a folder destination")
        dest = replace(dest, path=Path(dest.path).absolute())
    else:
        raise ConfigError(
            f"{label}.type: must be 'dicom', 'dicomweb' or 'folder', not {dest.type!r}"
        )
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(dest, key)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{label}.{key}: no such file {path}")
            dest = replace(dest, **{key: Path(path).absolute()})
    if (dest.tls_cert is None) != (dest.tls_key is None):
        raise ConfigError(f"{label}.tls_cert: tls_cert and tls_key go together")
    if dest.tls_cert is not None and dest.tls_ca is None:
        raise ConfigError(f"{label}.tls_ca: required with tls_cert (TLS needs the CA)")
    if dest.max_attempts < 1:
        raise ConfigError(f"{label}.max_attempts: must be >= 1")
    if dest.probe_max_seconds <= 0:
        raise ConfigError(f"{label}.probe_max_seconds: must be > 0")
    return dest


def _check_dicomweb(dest: DestinationConfig, label: str) -> DestinationConfig:
    """A STOW-RS destination: an http(s) base URL, auth from the environment, a bounded batch."""
    url = dest.base_url.rstrip("/")
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ConfigError(f"{label}.url: required for a dicomweb destination, http(s)://host/...")
    if "@" in rest.split("/", 1)[0]:
        raise ConfigError(f"{label}.url: no credentials in the URL (use auth and password_env)")
    if dest.auth not in ("none", "basic", "bearer"):
        raise ConfigError(f"{label}.auth: must be 'none', 'basic' or 'bearer', not {dest.auth!r}")
    if dest.auth == "basic":
        if not dest.username:
            raise ConfigError(f"{label}.username: required with auth = 'basic'")
        if not dest.password_env:
            raise ConfigError(
                f"{label}.password_env: required with auth = 'basic' (the name of an"
                " environment variable holding the password)"
            )
    if dest.auth == "bearer" and bool(dest.token_env) == (dest.token_file is not None):
        raise ConfigError(f"{label}.token_env: auth = 'bearer' needs token_env or token_file")
    for key in ("ca_file", "token_file"):
        path = getattr(dest, key)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{label}.{key}: no such file {path}")
            dest = replace(dest, **{key: Path(path).absolute()})
    if dest.ca_file is not None and scheme != "https":
        raise ConfigError(f"{label}.ca_file: only for an https url")
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(dest, key) is not None:
            raise ConfigError(f"{label}.{key}: not for a dicomweb destination (use ca_file)")
    if not 1 <= dest.instances_per_request <= 1000:
        raise ConfigError(f"{label}.instances_per_request: must be 1-1000")
    if dest.timeout_seconds <= 0:
        raise ConfigError(f"{label}.timeout_seconds: must be > 0")
    return replace(dest, base_url=url)


def parse_source(entry: Any, index: int) -> SourceConfig:
    label = f"sources[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    for key in ("name", "ae_title", "host", "port"):
        if key not in entry:
            raise ConfigError(f"{label}.{key}: required")
    src = section(SourceConfig, entry, label)
    if not src.name:
        raise ConfigError(f"{label}.name: must not be empty")
    if not src.ae_title or len(src.ae_title) > 16 or not src.ae_title.isascii():
        raise ConfigError(f"{label}.ae_title: must be 1-16 ASCII characters")
    if not src.host:
        raise ConfigError(f"{label}.host: must not be empty")
    check_port(src.port, f"{label}.port")
    if src.retrieve not in ("move", "get"):
        raise ConfigError(f"{label}.retrieve: {src.retrieve!r} is not one of move, get")
    if src.max_concurrent < 1:
        raise ConfigError(f"{label}.max_concurrent: must be >= 1")
    if src.pause_seconds < 0:
        raise ConfigError(f"{label}.pause_seconds: must be >= 0")
    return src
