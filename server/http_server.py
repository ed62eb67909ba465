"""Serving the HTTP port with uvicorn inside the server's own event loop.

uvicorn's ``Server.serve`` would install its own signal handlers and run a loop of its own;
here the socket is bound first (so that a taken port fails before anything starts), the
server is started on that socket in the running loop, and ``stop`` drains it in two stages:
stop accepting and let open responses finish within the grace period, then cancel what is
left and close its connections.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from .http import AsgiApp

__all__ = ["HttpServer", "TlsFiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS (``client_ca``: require client certificates that chain to it)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for ``host:port`` (``[v6]:port`` too; port 0 picks one).

    Raises:
        OSError: the address cannot be bound.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every interface
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family)


class HttpServer:
    """A running uvicorn server on a socket we bound.

    Args:
        app: the ASGI application.
        sock: the bound socket (see ``bind``); the server owns it from now on.
        tls: serve TLS (and mutual TLS) with these files.
    """

    def __init__(self, app: AsgiApp, sock: socket.socket, tls: TlsFiles | None = None) -> None:
        config = uvicorn.Config(
            app,
            http="h11",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ws="none",
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._stopped = False

    async def start(self) -> None:
        """Start accepting connections on the socket."""
        await self._server.startup(sockets=[self._sock])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, give open responses ``grace_s`` to finish, then cut them. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        # Typed as int by uvicorn, used as any number of seconds (asyncio.wait_for).
        self._server.config.timeout_graceful_shutdown = max(grace_s, 0.1)  # type: ignore[assignment]
        await self._server.shutdown(sockets=[self._sock])
        left = list(self._server.server_state.connections)
        for connection in left:
            connection.transport.close()
        if left:
            log.warning("HTTP connections cut at the end of the grace period: %d", len(left))
