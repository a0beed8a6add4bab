"""uvicorn serving the console in a thread of the node process, started and stopped with it."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from deid_node.config import ConsoleConfig
from deid_node.console.app import create_app
from deid_node.console.auth import Sessions
from deid_node.console.metrics import NodeView
from deid_node.errors import ConfigError
from deid_node.log import get_logger

log = get_logger("deid_node.console")
START_TIMEOUT_SECONDS = 20.0


class ConsoleServer:
    def __init__(self, config: ConsoleConfig, view: NodeView) -> None:
        self.config = config
        tls = config.tls_cert is not None
        self.app = create_app(view, Sessions(config.users_file), secure_cookies=tls)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_config=None,  # ours (structlog) stays as configured
                access_log=False,  # URLs hold UIDs only, but one line per scrape is noise
                lifespan="off",
                ssl_certfile=str(config.tls_cert) if tls else None,
                ssl_keyfile=str(config.tls_key) if tls else None,
            )
        )
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1] if self._socket else self.config.port

    def start(self) -> None:
        """Listen (a clear ConfigError naming console.port when the port is taken), then serve."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"console.port: cannot listen on {self.config.host}:{self.config.port}:"
                f" {exc.strerror or exc}"
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError("console: the web server did not start (see the log)")
            time.sleep(0.02)
        log.info(
            "console_started",
            url=f"{'https' if self.config.tls_cert else 'http'}://{self.config.host}:{self.port}/",
            users_file=str(self.config.users_file),
            users_file_exists=self.config.users_file.exists(),
        )

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
