"""Serving the HTTP port with uvicorn inside the server's own event loop.

uvicorn's ``Server.serve`` would install its own signal handlers and run a loop of its own;
here the socket is bound by ``app`` first (so that a taken port fails before anything
starts), the server is started on that socket in the running loop, and ``stop`` drains it in
two stages: stop accepting and let open responses finish within the grace period, then
cancel what is left and close its connections. ``app`` imports this module only when
``--http-listen`` is on.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from scanjobs.v1.scanjobs_connect import ScanServiceASGIApplication

from .auth import BearerTokens
from .catalog import Catalog
from .config import Config
from .connect import ConnectScanService
from .http import AsgiApp, HttpApp
from .library_watch import RootState
from .live_service import StreamSlots
from .metrics import Metrics
from .queue import JobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy

__all__ = ["HttpServer", "TlsFiles", "serve_http"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS (``client_ca``: require client certificates that chain to it)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


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


async def serve_http(
    config: Config,
    sock: socket.socket,
    queue: JobQueue,
    catalog: Catalog,
    roots: RootPolicy,
    metrics: Metrics,
    checks: RootChecks,
    root_states: Callable[[], Awaitable[list[RootState]]] | None = None,
    video_slots: StreamSlots | None = None,
) -> HttpServer:
    """Start the HTTP port on ``sock``: Connect / gRPC-Web, REST and the page, over the same
    core objects, tokens, TLS files and limits as the gRPC port."""
    tokens = BearerTokens(config.tokens)
    service = ConnectScanService(
        queue,
        catalog,
        roots,
        tokens,
        checks,
        on_call=metrics.on_rpc,
        root_states=root_states,
        video_slots=video_slots,
    )
    connect = ScanServiceASGIApplication(service, read_max_bytes=config.max_message_bytes)
    app = HttpApp(
        connect,
        queue,
        roots,
        tokens,
        service.record,
        checks=checks,
        cors_origins=config.http_cors_origins,
        max_body_bytes=config.max_message_bytes,
    )
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    server = HttpServer(app, sock, tls)
    await server.start()
    return server
