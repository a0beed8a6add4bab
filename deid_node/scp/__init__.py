"""The C-STORE/C-ECHO SCP: the AE and its server (`ae`), connections from accept to close with
the network limits (`server`), the checks on bytes and headers (`limits`), and the event
handlers that store what arrives (`handlers`)."""

from deid_node.scp.ae import (
    build_ae,
    enable_chunked_receive,
    network_limits,
    server_ssl_context,
    start_server,
    store_limits,
)
from deid_node.scp.handlers import StoreLimits, ae_title_text, handlers
from deid_node.scp.server import NodeServer

__all__ = [
    "NodeServer",
    "StoreLimits",
    "ae_title_text",
    "build_ae",
    "enable_chunked_receive",
    "handlers",
    "network_limits",
    "server_ssl_context",
    "start_server",
    "store_limits",
]
