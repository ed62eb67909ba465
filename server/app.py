"""Wires the server together: catalog, probe pool, queue, servicer, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc

from .catalog import Catalog
from .config import Config
from .errors import StorageIOError
from .leader import lead
from .library_watch import LibraryWatcher, QueueRunner, RootState, WatchConfig, cancel_quietly
from .metrics import Metrics
from .pgqueue import ClusterConfig, PgJobQueue
from .pgstore import PgCatalog, PgDatabase
from .probe import PROBE_COMMAND
from .queue import AsyncioJobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy
from .scan import ScanConfig, Scanner
from .scan_wire import WorkerSettings
from .scanpool import ScanWorkers
from .service import ScanService, ServiceInterceptor
from .shared_roots import SharedRootStates
from .store import Database, SqliteCatalog
from .store_jobs import SqliteJobStore

if TYPE_CHECKING:
    from .http_server import HttpServer

__all__ = ["App", "ListenError", "start"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScanService"].full_name
_SERVER_OPTIONS = [
    # A quiet WatchJob stream is kept honest by HTTP/2 pings: a vanished client is noticed
    # in about 30 s instead of when the kernel gives up on the connection.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Without this a second server on the same port would silently share its connections.
    ("grpc.so_reuseport", 0),
]


@dataclass(slots=True)
class App:
    """A running server and what it owns."""

    server: grpc.aio.Server
    port: int
    queue: AsyncioJobQueue | PgJobQueue
    workers: ScanWorkers
    db: Database | PgDatabase
    health: health.aio.HealthServicer
    calls: ServiceInterceptor
    metrics: Metrics
    grace_s: float
    lame_duck_s: float
    catalog: Catalog
    service: ScanService
    http: HttpServer | None = None
    watching: asyncio.Task[None] | None = None
    checks: RootChecks | None = None
    stopped: bool = False

    @property
    def http_port(self) -> int | None:
        """The HTTP port, when ``--http-listen`` is on."""
        return self.http.port if self.http is not None else None

    async def stop(self) -> None:
        """Drain, then stop: every part in two stages, none left running. Idempotent.

        1. Lame duck: health says NOT_SERVING and every new ScanService call is answered
           UNAVAILABLE (``SHUTTING_DOWN``) for ``lame_duck_s`` seconds, while the server
           still takes calls, so that a client that sent one after NOT_SERVING gets an
           answer it retries elsewhere instead of grpc's own CANCELLED (grpc/grpc#41785).
           Meanwhile running jobs stop at their next safe point (they resume on the next
           start) and WatchJob streams end with UNAVAILABLE.
        2. Within the grace period, calls in flight finish; then the gRPC server stops
           (cancelling what is left), the scan workers exit (or are killed; one stuck in the
           kernel on a dead share is abandoned), and the database and the metrics endpoint
           close.
        """
        if self.stopped:
            return
        self.stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        lame_duck_until = loop.time() + min(self.lame_duck_s, self.grace_s)
        self.calls.refuse_new_calls()  # first: who saw NOT_SERVING never gets through
        await self.health.enter_graceful_shutdown()
        await cancel_quietly(self.watching)  # no new scans of what changes
        await self.queue.close(self.grace_s)  # ends WatchJob streams with UNAVAILABLE
        self.service.close()  # ends WatchVideos streams with UNAVAILABLE
        await asyncio.sleep(max(0.0, lame_duck_until - loop.time()))
        # Wait for our own calls only: a client's endless health Watch must not hold us up.
        if not await self.calls.drained(max(0.0, deadline - loop.time())):
            log.warning("calls still in flight at the end of the grace period")
        if self.http is not None:
            await self.http.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        await self.server.stop(None)
        # Within what is left of the grace period (a killed worker stuck on a dead share is
        # abandoned, not waited for).
        await asyncio.gather(
            self.workers.close(min(2.0, max(0.2, deadline - loop.time()))),
            self.checks.close() if self.checks is not None else asyncio.sleep(0),
        )
        await self.catalog.close()
        await self.db.close()
        self.metrics.close()
        log.info("server stopped")


async def start(
    config: Config,
    *,
    probe_command: Sequence[str] = PROBE_COMMAND,
    clock_ns: Callable[[], int] = time.time_ns,
) -> App:
    """Start serving per ``config``; returns once the port is bound.

    Args:
        config: the settings.
        probe_command: the probe worker's command line (tests pass workers that can be
            made to hang or crash on purpose).
        clock_ns: the catalog's wall clock (first/last-seen and missing times, the missing
            retention), in nanoseconds.

    Raises:
        DatabaseCorrupt: the database under ``config.data_dir`` is unusable.
        ListenError: the listen address could not be bound.
    """
    metrics = Metrics()
    # The server never touches a requested path itself: a thread stuck in the kernel on a dead
    # share would keep the process from exiting. Roots are resolved, and root checks run, in a
    # helper process, with --io-timeout.
    checks = RootChecks(config.roots, config.io_timeout_s, on_abandon=metrics.on_abandoned_process)
    metrics.watch_stuck_calls(lambda: checks.stuck)
    calls = ServiceInterceptor(
        config.tokens, on_call=metrics.on_rpc, max_health_watchers=config.max_health_watchers
    )
    options = [
        *_SERVER_OPTIONS,
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: one connection cannot hold thousands of
        # streams (a client past it waits, or gets its stream refused).
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
    ]
    server = grpc.aio.server(interceptors=[calls], options=options)
    port = _bind(server, config)  # first: a taken port fails before anything starts
    # Whatever opens below is closed again, in reverse order, if a later step fails.
    async with contextlib.AsyncExitStack() as undo:
        http_socket = _bind_http(config)
        if http_socket is not None:
            undo.callback(http_socket.close)
        undo.push_async_callback(checks.close)
        roots = await checks.start()
        db, catalog = await _open_storage(config)
        undo.push_async_callback(db.close)
        undo.push_async_callback(catalog.close)
        await _tidy_catalog(catalog, roots, config, clock_ns)
        scan_config = _scan_config(config)
        workers = ScanWorkers(
            config.probe_processes,
            _worker_settings(config, roots, db, scan_config, probe_command),
            on_probe=metrics.on_probe,
            on_abandon=metrics.on_abandoned_process,
        )
        await workers.start()
        undo.push_async_callback(workers.close)
        scanner = Scanner(
            roots, workers, catalog, scan_config, clock_ns=clock_ns, locate=checks.locate
        )
        queue = _queue(config, db, scanner, metrics)
        await queue.start()
        undo.pop_all()  # started: from here on App.stop() owns every part
    if config.metrics_listen:
        metrics.serve(
            config.metrics_listen,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_client_ca=config.tls_client_ca,
        )

    shared = SharedRootStates(db.url) if isinstance(db, PgDatabase) else None
    watcher = _watcher(config, queue, roots, checks, metrics, shared) if config.watch else None
    root_states = _root_states(watcher, shared)
    service = ScanService(
        queue, catalog, roots, checks=checks, max_video_watchers=config.max_watchers,
        root_states=root_states,
    )  # fmt: skip
    pb_grpc.add_ScanServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await server.start()
    http = None
    if http_socket is not None:
        # Imported only when the HTTP port is on: uvicorn and connectrpc cost about half a
        # second of start-up that a gRPC-only server need not pay.
        from .http_server import serve_http

        http = await serve_http(
            config, http_socket, queue, catalog, roots, metrics, checks, root_states,
            service.video_slots,
        )  # fmt: skip
    await _set_health(health_servicer, serving=True)
    if isinstance(db, PgDatabase):  # a balancer sends clients elsewhere while it is down

        async def follow_database(reachable: bool) -> None:
            await _set_health(health_servicer, serving=reachable)

        db.monitor(follow_database)
    log.info(
        "serving",
        extra={
            "listen": config.listen,
            "port": port,
            "http_port": http.port if http else None,
            "roots": list(roots.resolved),
        },
    )
    return App(
        server,
        port,
        queue,
        workers,
        db,
        health_servicer,
        calls,
        metrics,
        config.shutdown_grace_s,
        config.lame_duck_s,
        catalog,
        service,
        http,
        _watch(watcher, shared, config) if watcher is not None else None,
        checks,
    )


def _watch(
    watcher: LibraryWatcher, shared: SharedRootStates | None, config: Config
) -> asyncio.Task[None]:
    """Start watching: at once with SQLite, whenever this replica leads with PostgreSQL."""
    if shared is not None:  # one replica at a time watches, and tells the others
        return asyncio.create_task(lead(shared.url, shared.lead, retry_s=config.lease_s))
    return asyncio.create_task(watcher.run(), name="watch")


def _root_states(
    watcher: LibraryWatcher | None, shared: SharedRootStates | None
) -> Callable[[], Awaitable[list[RootState]]] | None:
    """What ListRoots reports: the leader's view with PostgreSQL, this watcher's with SQLite."""
    if watcher is None:
        return None
    if shared is not None:
        return shared.states

    async def local() -> list[RootState]:
        return watcher.states()

    return local


def _watcher(
    config: Config,
    queue: AsyncioJobQueue | PgJobQueue,
    roots: RootPolicy,
    checks: RootChecks,
    metrics: Metrics,
    shared: SharedRootStates | None,
) -> LibraryWatcher:
    watch_config = WatchConfig(
        settle_s=config.watch_settle_s,
        poll_s=config.poll_interval_s,
        reconcile_s=config.reconcile_interval_s,
        extensions=config.extensions,
    )
    idle = (
        "another replica watches (one at a time with --database)"
        if config.database
        else "not watched yet"
    )

    def on_state(state: RootState) -> None:
        metrics.on_root_state(state)
        if shared is not None:
            shared.on_state(state)

    watcher = LibraryWatcher(
        roots.resolved, QueueRunner(queue, checks), watch_config,
        on_state=on_state, idle_reason=idle,
    )  # fmt: skip
    if shared is not None:
        shared.watch(watcher)
    return watcher


def _scan_config(config: Config) -> ScanConfig:
    return ScanConfig(
        extensions=config.extensions,
        lanes=config.probe_processes,
        max_errors=config.max_errors,
        missing_retention_ns=int(config.missing_retention_s * 1e9),
        history_ns=int(config.catalog_history_s * 1e9),
    )


def _worker_settings(
    config: Config,
    roots: RootPolicy,
    db: Database | PgDatabase,
    scan: ScanConfig,
    probe_command: Sequence[str],
) -> WorkerSettings:
    """What each scan worker is told: where the catalog is, and how to probe."""
    return WorkerSettings(
        database=db.url if isinstance(db, PgDatabase) else str(db.path),
        roots=roots.given,
        resolutions=roots.resolutions,
        extensions=tuple(sorted(scan.extensions)),
        seen_resolution_ns=scan.seen_resolution_ns,
        chunk=scan.batch_size,
        # One probe process per worker: a chunk goes to it in one round trip (its threads
        # share the files out), not in several that would queue for it one after another.
        probe_batch=max(scan.batch_size, config.io_concurrency),
        probe_command=tuple(probe_command),
        probe_processes=1,
        probe_timeout_s=config.probe_timeout_s,
        probe_memory_mib=config.probe_memory_mib,
        probe_user=config.probe_user,
        io_timeout_s=config.io_timeout_s,
        io_concurrency=config.io_concurrency,
    )


def _queue(
    config: Config, db: Database | PgDatabase, scanner: Scanner, metrics: Metrics
) -> AsyncioJobQueue | PgJobQueue:
    queue: AsyncioJobQueue | PgJobQueue
    if isinstance(db, PgDatabase):  # replicas share the jobs through PostgreSQL
        cluster = ClusterConfig(
            replica=f"{socket.gethostname()}:{os.getpid()}", lease_s=config.lease_s
        )
        queue = PgJobQueue(
            scanner, db, config.queue_config(), cluster, listeners=[metrics.on_event]
        )
    else:
        queue = AsyncioJobQueue(
            scanner,
            config.queue_config(),
            store=SqliteJobStore(db),
            listeners=[metrics.on_event],
        )
    metrics.watch_queue(queue.stats)
    return queue


def _bind_http(config: Config) -> socket.socket | None:
    if not config.http_listen:
        return None
    host, _, port = config.http_listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every interface
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family)
    except (OSError, ValueError) as exc:
        raise ListenError(f"cannot listen on {config.http_listen}: {exc}") from None


async def _set_health(servicer: health.aio.HealthServicer, *, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _open_storage(config: Config) -> tuple[Database | PgDatabase, Catalog]:
    """PostgreSQL (shared by replicas) when ``--database`` names one, else SQLite under
    ``--data-dir`` (one server)."""
    if config.database:
        pg = await PgDatabase.open(config.database)
        catalog = PgCatalog(pg)
        await catalog.listen()
        return pg, catalog
    try:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageIOError(f"cannot create the data directory {config.data_dir}: "
                             f"{exc.strerror}") from None  # fmt: skip
    db = await Database.open(config.data_dir / "scanjobs.db")
    return db, SqliteCatalog(db)


async def _tidy_catalog(
    catalog: Catalog, roots: RootPolicy, config: Config, clock_ns: Callable[[], int]
) -> None:
    """Purge expired tombstones and, when asked, whatever lies outside the roots."""
    purged = await catalog.purge_missing(clock_ns() - int(config.missing_retention_s * 1e9))
    await catalog.prune_changes(clock_ns() - int(config.catalog_history_s * 1e9))
    if config.purge_outside_roots:
        outside = await catalog.purge_outside(roots.listed())
        log.info("purged catalog rows outside the roots", extra={"rows": outside})
    if purged:
        log.info("purged missing videos past their retention", extra={"videos": purged})


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None  # noqa: S101
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class ListenError(RuntimeError):
    """The listen address cannot be bound."""


def _bind(server: grpc.aio.Server, config: Config) -> int:
    address = config.listen
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            port = server.add_secure_port(address, _tls_credentials(config))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {address}: {exc}") from None
    except OSError as exc:
        raise ListenError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    if port == 0:
        raise ListenError(f"cannot listen on {address}")
    return port
