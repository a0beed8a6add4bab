"""[node] (the SCP: address, limits, allowed peers, TLS, replica_id), [store] and [console]."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deid_node.config.model import ConsoleConfig, NodeConfig, StoreConfig, TlsConfig
from deid_node.config.tables import check_port, replace, section
from deid_node.errors import ConfigError


def parse_node(raw: Mapping[str, Any]) -> NodeConfig:
    """[node]: the SCP's address, network and disk limits, TLS, the replica's name."""
    if not isinstance(raw.get("node", {}), Mapping):
        raise ConfigError("node: expected a table")
    node_raw = dict(raw.get("node", {}))
    peers = _parse_allowed_peers(node_raw.pop("allowed_peers", {}))
    tls = _parse_tls(node_raw.pop("tls", None))
    node = section(NodeConfig, node_raw, "node")
    node = replace(node, allowed_peers=peers, tls=tls)
    if not node.ae_title or len(node.ae_title) > 16 or not node.ae_title.isascii():
        raise ConfigError("node.ae_title: must be 1-16 ASCII characters")
    check_port(node.port, "node.port")
    for key in ("max_instance_mb", "min_free_disk_mb", "workers"):
        if getattr(node, key) < (1 if key == "workers" else 0):
            raise ConfigError(f"node.{key}: must be positive")
    _check_network_limits(node)
    node = replace(node, data_dir=Path(node.data_dir).absolute())
    if not node.replica_id:
        import socket

        node = replace(node, replica_id=f"{socket.gethostname()}:{node.port}")
    if len(node.replica_id) > 64 or not re.fullmatch(r"[A-Za-z0-9._:-]+", node.replica_id):
        raise ConfigError("node.replica_id: 1-64 characters of letters, digits, . _ : -")
    return node


def _parse_allowed_peers(raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError("node.allowed_peers: expected a table AE = [CIDR, ...]")
    peers: dict[str, tuple[str, ...]] = {}
    for ae, networks in raw.items():
        key = f"node.allowed_peers.{ae}"
        if not isinstance(networks, list) or not networks:
            raise ConfigError(f'{key}: expected a non-empty list of networks such as "10.0.0.0/24"')
        for network in networks:
            try:
                ipaddress.ip_network(str(network), strict=False)
            except ValueError:
                raise ConfigError(f"{key}: {network!r} is not an IP network") from None
        peers[str(ae).strip()] = tuple(str(n) for n in networks)
    return peers


def _parse_tls(raw: Any) -> TlsConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("node.tls: expected a table with cert, key and optionally ca")
    for key in ("cert", "key"):
        if key not in raw:
            raise ConfigError(f"node.tls.{key}: required when [node.tls] is present")
    tls = section(TlsConfig, raw, "node.tls")
    tls = replace(tls, **{k: Path(v).absolute() for k, v in vars(tls).items() if v is not None})
    for key, path in vars(tls).items():
        if path is not None and not path.is_file():
            raise ConfigError(f"node.tls.{key}: no such file {path}")
    return tls


def _check_network_limits(node: NodeConfig) -> None:
    at_least = {
        "max_decoded_mb": 0,  # 0: no limit
        "max_pdu_kb": 4,
        "max_association_mb": 0,
        "max_association_seconds": 0,
        "max_associations": 1,
        "max_pending_connections": 1,
    }
    for key, low in at_least.items():
        if getattr(node, key) < low:
            raise ConfigError(f"node.{key}: must be >= {low}")
    if node.max_pdu_kb > 65536:
        raise ConfigError("node.max_pdu_kb: must be <= 65536 (64 MiB)")
    if node.association_request_timeout_seconds <= 0:
        raise ConfigError("node.association_request_timeout_seconds: must be > 0")


def parse_store(raw: Any) -> StoreConfig:
    store = section(StoreConfig, raw, "store")
    if store.backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"store.backend: {store.backend!r} is not one of sqlite, postgresql")
    if store.backend == "sqlite":
        for key in ("url", "shared_dir"):
            if getattr(store, key):
                raise ConfigError(f'store.{key}: only with backend = "postgresql"')
        return store
    if not store.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.url: required, postgresql://user@host:port/database")
    if "@" in store.url.split("://", 1)[1] and ":" in store.url.split("://", 1)[1].split("@")[0]:
        raise ConfigError(
            "store.url: no password in the URL (PGPASSWORD in the environment or ~/.pgpass)"
        )
    if store.shared_dir is None:
        raise ConfigError(
            'store.shared_dir: required with backend = "postgresql" (a folder every replica'
            " mounts: spool, outputs, quarantine, secrets)"
        )
    if store.lease_seconds < 2:
        raise ConfigError("store.lease_seconds: must be >= 2")
    return replace(store, shared_dir=Path(store.shared_dir).absolute())


def parse_console(raw: Any) -> ConsoleConfig:
    console = section(ConsoleConfig, raw, "console")
    check_port(console.port, "console.port")
    if (console.tls_cert is None) != (console.tls_key is None):
        raise ConfigError("console.tls_cert: tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        path = getattr(console, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"console.{key}: no such file {path}")
    paths = {
        key: Path(getattr(console, key)).absolute()
        for key in ("users_file", "tls_cert", "tls_key")
        if getattr(console, key) is not None
    }
    return replace(console, **paths)
