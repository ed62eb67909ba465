"""Server settings from command-line flags, each also readable from ``SCANJOBS_<NAME>``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .pgqueue import ClusterConfig
from .probe import DEFAULT_PROBE_MEMORY_MIB, MIN_PROBE_MEMORY_MIB, worker_account
from .queue import QueueConfig
from .scan import ScanConfig

__all__ = ["Config", "is_loopback", "parse_args"]


_QUEUE = QueueConfig()
_SCAN = ScanConfig()
_LEASE_S = ClusterConfig().lease_s


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server needs to start; see ``--help`` for each field's meaning.

    The defaults here are the flags' defaults too; the queue's and the scan's own come from
    :class:`QueueConfig`, :class:`ClusterConfig` and :class:`ScanConfig`, written once.
    """

    roots: tuple[str, ...]
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path(".data")
    workers: int = _QUEUE.workers
    job_timeout_s: float = _QUEUE.job_timeout_s
    probe_processes: int = os.cpu_count() or 1
    probe_timeout_s: float = 30.0
    probe_memory_mib: int = DEFAULT_PROBE_MEMORY_MIB
    probe_user: str | None = None
    io_concurrency: int = 16
    io_timeout_s: float = 30.0
    extensions: frozenset[str] = _SCAN.extensions
    max_pending: int = _QUEUE.max_pending
    max_jobs: int = _QUEUE.max_jobs
    shutdown_grace_s: float = 10.0
    lame_duck_s: float = 2.0
    log_level: str = "INFO"
    job_retention_s: float = _QUEUE.retention_s
    tokens: frozenset[str] = field(default_factory=frozenset)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_watchers: int = _QUEUE.max_watchers
    max_watchers_per_job: int = _QUEUE.max_watchers_per_job
    progress_budget_per_s: float = _QUEUE.progress_budget_per_s
    max_health_watchers: int = 100
    max_streams_per_connection: int = 1000
    max_errors: int = _SCAN.max_errors
    max_message_bytes: int = 64 * 1024
    metrics_listen: str | None = None
    database: str | None = None
    lease_s: float = _LEASE_S
    missing_retention_s: float = 30 * 24 * 3600.0
    purge_outside_roots: bool = False
    catalog_history_s: float = 7 * 24 * 3600.0
    watch: bool = False
    watch_settle_s: float = 2.0
    poll_interval_s: float = 60.0
    reconcile_interval_s: float = 24 * 3600.0
    http_listen: str | None = None
    http_cors_origins: tuple[str, ...] = ()

    def queue_config(self) -> QueueConfig:
        """The job queue's tunables that these settings choose."""
        return QueueConfig(
            workers=self.workers,
            job_timeout_s=self.job_timeout_s,
            max_pending=self.max_pending,
            max_jobs=self.max_jobs,
            retention_s=self.job_retention_s,
            max_watchers=self.max_watchers,
            max_watchers_per_job=self.max_watchers_per_job,
            progress_budget_per_s=self.progress_budget_per_s,
        )


def _default(name: str) -> str | None:
    """A :class:`Config` field's default as the text argparse converts."""
    value = Config.__dataclass_fields__[name].default
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, tuple):
        return ",".join(value) or None
    return None if value is None else str(value)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SCANJOBS_{name}", default)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probe_memory(text: str) -> int:
    value = int(text)
    if value != 0 and value < MIN_PROBE_MEMORY_MIB:
        raise argparse.ArgumentTypeError(
            f"must be 0 (no limit) or at least {MIN_PROBE_MEMORY_MIB} MiB (a worker needs "
            f"that much address space to load FFmpeg), got {value}"
        )
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise argparse.ArgumentTypeError(
                f"an origin is scheme://host[:port], without a path: {origin!r}"
            )
    return origins


def _extensions(text: str) -> frozenset[str]:
    items = {e.strip().lower() for e in text.split(",") if e.strip()}
    if not items:
        raise argparse.ArgumentTypeError("at least one extension is required")
    return frozenset(e if e.startswith(".") else f".{e}" for e in items)


# (flag, environment name, type, Config field or None, help). A flag's default is its field's.
_FLAGS: tuple[tuple[str, str, object, str | None, str], ...] = (
    ("--listen", "LISTEN", str, "listen", "address:port to serve on"),
    ("--data-dir", "DATA_DIR", Path, "data_dir",
     "where scanjobs.db (jobs, events, catalog) lives"),
    ("--database", "DATABASE", str, "database",
     "postgresql:// URL: keep jobs, events and the catalog in PostgreSQL, shared by every "
     "replica, instead of SQLite; pass it as SCANJOBS_DATABASE and the password in a "
     ".pgpass file, not on the command line"),
    ("--lease", "LEASE", _positive_float, "lease_s",
     "with --database: seconds a replica's claim on a job holds without renewal; then "
     "another replica takes the job over"),
    ("--workers", "WORKERS", _positive_int, "workers", "jobs running at once"),
    ("--job-timeout", "JOB_TIMEOUT", _positive_float, "job_timeout_s",
     "seconds a job may run unless its request says otherwise"),
    ("--probe-processes", "PROBE_PROCESSES", _positive_int, "probe_processes",
     "probe worker processes; the default is the CPU count"),
    ("--probe-timeout", "PROBE_TIMEOUT", _positive_float, "probe_timeout_s",
     "seconds one file may take to probe before it is a per-file error"),
    ("--probe-memory", "PROBE_MEMORY", _probe_memory, "probe_memory_mib",
     "address-space limit of each probe worker, in MiB (a file that needs more is a per-file "
     "error); 0 for none"),
    ("--probe-user", "PROBE_USER", str, "probe_user",
     "run probe workers as this user (name or uid), with its primary group only; the "
     "server must start as root"),
    ("--io-concurrency", "IO_CONCURRENCY", _positive_int, "io_concurrency",
     "files probed and stated in flight at once (threads in the probe and scan workers, "
     "independent of --probe-processes); the default suits network storage"),
    ("--io-timeout", "IO_TIMEOUT", _positive_float, "io_timeout_s",
     "seconds any filesystem operation may take (a listing, a stat, the root check of "
     "SubmitScan) before it is a per-folder error: a dead share costs one error, not a job"),
    ("--extensions", "EXTENSIONS", _extensions, "extensions",
     "comma-separated video file extensions"),
    ("--max-pending", "MAX_PENDING", _positive_int, "max_pending",
     "pending jobs accepted before RESOURCE_EXHAUSTED"),
    ("--max-jobs", "MAX_JOBS", _positive_int, "max_jobs",
     "jobs kept in total: beyond it the oldest ended jobs are dropped, and a submit is "
     "RESOURCE_EXHAUSTED when none has ended"),
    ("--max-watchers", "MAX_WATCHERS", _positive_int, "max_watchers",
     "open WatchJob streams in total before RESOURCE_EXHAUSTED"),
    ("--max-watchers-per-job", "MAX_WATCHERS_PER_JOB", _positive_int, "max_watchers_per_job",
     "open WatchJob streams of one job before RESOURCE_EXHAUSTED"),
    ("--progress-budget", "PROGRESS_BUDGET", _positive_float, "progress_budget_per_s",
     "progress messages per second sent to all WatchJob streams together; with more "
     "watchers each gets progress less often (state changes always go out at once)"),
    ("--max-health-watchers", "MAX_HEALTH_WATCHERS", _positive_int, "max_health_watchers",
     "open health Watch streams (unauthenticated) in total before RESOURCE_EXHAUSTED"),
    ("--max-streams-per-connection", "MAX_STREAMS_PER_CONNECTION", _positive_int,
     "max_streams_per_connection",
     "calls one client connection may have open at once (HTTP/2 max concurrent streams)"),
    ("--max-errors", "MAX_ERRORS", _positive_int, "max_errors",
     "per-file errors listed per job; the rest are only counted"),
    ("--max-message-bytes", "MAX_MESSAGE_BYTES", _positive_int, "max_message_bytes",
     "largest request message accepted"),
    ("--job-retention", "JOB_RETENTION", _positive_float, "job_retention_s",
     "seconds an ended job is kept"),
    ("--missing-retention", "MISSING_RETENTION", _positive_float, "missing_retention_s",
     "seconds a video found missing is kept (hidden, restored if it comes back) before it "
     "is purged from the catalog"),
    ("--catalog-history", "CATALOG_HISTORY", _positive_float, "catalog_history_s",
     "seconds the catalog's changes are kept for WatchVideos; a client further behind "
     "gets HISTORY_EXPIRED and lists again"),
    ("--watch-settle", "WATCH_SETTLE", _positive_float, "watch_settle_s",
     "with --watch: seconds a changed file's size and mtime must stay the same (and its "
     "directory quiet) before it is scanned"),
    ("--poll-interval", "POLL_INTERVAL", _positive_float, "poll_interval_s",
     "with --watch: seconds between polls of a root that events cannot watch (a network "
     "file system, or the inotify watch limit reached)"),
    ("--reconcile-interval", "RECONCILE_INTERVAL", _positive_float, "reconcile_interval_s",
     "with --watch: seconds between full reconciles of each root (events can be missed)"),
    ("--shutdown-grace", "SHUTDOWN_GRACE", _positive_float, "shutdown_grace_s",
     "seconds to drain on SIGTERM before stopping hard"),
    ("--lame-duck", "LAME_DUCK", _non_negative_float, "lame_duck_s",
     "seconds, within the grace period, that a draining server keeps answering new calls "
     "UNAVAILABLE (health NOT_SERVING) before it stops listening"),
    ("--http-listen", "HTTP_LISTEN", str, "http_listen",
     "host:port to serve HTTP on: Connect and gRPC-Web, the REST paths /api/v1/..., and the "
     "web page at /; same tokens, TLS and limits as the gRPC port; off unless given"),
    ("--http-cors-origin", "HTTP_CORS_ORIGIN", _origins, "http_cors_origins",
     "comma-separated origins (scheme://host[:port]) whose pages may call the HTTP port; "
     "cross-origin requests are refused unless listed"),
    ("--metrics-listen", "METRICS_LISTEN", str, "metrics_listen",
     "host:port to serve Prometheus metrics on (/metrics; HTTPS with the server's TLS "
     "settings); off unless given"),
    ("--token-file", "TOKEN_FILE", Path, None,
     "file of bearer tokens, one per line: every ScanService call must carry one; refused "
     "when group- or world-writable"),
    ("--tls-cert", "TLS_CERT", Path, None, "server certificate chain (PEM): serve TLS"),
    ("--tls-key", "TLS_KEY", Path, None, "server private key (PEM)"),
    ("--tls-client-ca", "TLS_CLIENT_CA", Path, None,
     "CA bundle (PEM) that client certificates must chain to: mutual TLS"),
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scanjobs-server",
        description="Serve the scanjobs.v1.ScanService gRPC API. Every flag can also be set "
        "with an environment variable SCANJOBS_<FLAG> (e.g. SCANJOBS_LISTEN); SCANJOBS_ROOT "
        "takes a colon-separated list.",
    )
    p.add_argument("--root", action="append", dest="roots", metavar="DIR",
                   help="allowed scan root, absolute; repeatable; required")  # fmt: skip
    for flag, env, kind, name, text in _FLAGS:
        default = _default(name) if name else None
        shown = f" (default {default})" if default is not None else ""
        p.add_argument(flag, type=kind, default=_env(env, default), help=text + shown)  # type: ignore[arg-type]
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    p.add_argument("--insecure", action="store_true", default=bool(_env("INSECURE")),
                   help="allow a non-loopback --listen or --metrics-listen without "
                        "authentication (neither a token nor a client CA)")  # fmt: skip
    p.add_argument(
        "--watch",
        action="store_true",
        default=bool(_env("WATCH")),
        help="watch every --root: reconcile it at start, then scan what changes as it "
        "changes (with --database, one replica at a time watches)",
    )
    p.add_argument(
        "--purge-outside-roots",
        action="store_true",
        default=bool(_env("PURGE_OUTSIDE_ROOTS")),
        help="at start, delete catalog rows that lie outside every --root (listings hide them "
        "anyway); not with replicas whose roots differ",
    )
    return p


def is_loopback(listen: str) -> bool:
    """True if ``host:port`` only accepts connections from this machine."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


class UnsafeFile(ValueError):
    """A secret's file that others could change."""


def _tokens(path: Path | None) -> frozenset[str]:
    """The tokens in ``path``; refuses a file that others may write, as OpenSSH does.

    Raises:
        OSError: the file cannot be read.
        UnsafeFile: the file is writable by its group or by everyone.
    """
    if path is None:
        return frozenset()
    with path.open() as handle:  # the mode checked is the mode of the file read
        if os.fstat(handle.fileno()).st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeFile(
                f"--token-file {path} is writable by its group or by others: anyone who can "
                f"change it can let themselves in (chmod go-w {path})"
            )
        text = handle.read()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def _checked_tokens(parser: argparse.ArgumentParser, path: Path | None) -> frozenset[str]:
    try:
        tokens = _tokens(path)
    except OSError as exc:
        parser.error(f"cannot read --token-file: {exc.strerror}")
    except UnsafeFile as exc:
        parser.error(str(exc))
    if path is not None and not tokens:
        parser.error("--token-file holds no token")
    return tokens


def _password_in(url: str) -> bool:
    try:
        return bool(conninfo_to_dict(url).get("password"))
    except psycopg.ProgrammingError:
        return False  # not a valid URL: psycopg says so when the server connects


def _check_database(parser: argparse.ArgumentParser, url: str | None) -> None:
    if not url:
        return
    if not url.startswith(("postgresql://", "postgres://")):
        parser.error("--database takes a postgresql:// URL")
    # A value that differs from the environment's came from the command line, which every
    # local user can read (ps, /proc/PID/cmdline); the environment is private to the process.
    if url != _env("DATABASE") and _password_in(url):
        parser.error(
            "--database carries a password, which every local user can read on the command "
            "line: set SCANJOBS_DATABASE instead, or keep the password in a .pgpass file"
        )


def _check_exposure(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, authenticated: bool
) -> None:
    """Refuse a non-loopback address without authentication unless ``--insecure``.

    TLS alone is not authentication: it hides the calls from the network, not from whoever
    connects. The metrics endpoint cannot check tokens, so only mutual TLS admits it there.
    """
    if args.insecure:
        return
    for listen in filter(None, (args.listen, args.http_listen)):
        if not is_loopback(listen) and not authenticated:
            parser.error(
                f"refusing to listen on {listen} without authentication: anyone who can "
                "reach it could read your file system's layout. Add --token-file or "
                "--tls-client-ca (mutual TLS), or --insecure if the network is trusted."
            )
    metrics = args.metrics_listen
    on_loopback = metrics and (is_loopback(metrics) or not metrics.rpartition(":")[0])
    if metrics and not on_loopback and args.tls_client_ca is None:  # ":9100" is loopback
        parser.error(
            f"refusing to serve metrics on {metrics} without authentication: the metrics "
            "endpoint admits only mutual TLS (--tls-client-ca). Use a loopback address, add "
            "--tls-client-ca, or --insecure if the network is trusted."
        )


def _check_probe_user(parser: argparse.ArgumentParser, user: str | None) -> None:
    if user is None:
        return
    try:
        uid, _ = worker_account(user)
    except KeyError:
        parser.error(f"--probe-user: no such user: {user}")
    if os.geteuid() not in (0, uid):
        parser.error("--probe-user needs the server to start as root")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags (falling back to the environment); exits with usage on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    roots = args.roots or [r for r in (_env("ROOT") or "").split(":") if r]
    if not roots:
        parser.error("at least one --root (or SCANJOBS_ROOT) is required")
    for root in roots:
        if not os.path.isabs(root):
            parser.error(f"--root must be an absolute path: {root}")
    _check_database(parser, args.database)
    _check_probe_user(parser, args.probe_user)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    tokens = _checked_tokens(parser, args.token_file)
    _check_exposure(parser, args, authenticated=bool(tokens) or args.tls_client_ca is not None)
    return Config(
        listen=args.listen,
        roots=tuple(roots),
        data_dir=args.data_dir,
        workers=args.workers,
        job_timeout_s=args.job_timeout,
        probe_processes=args.probe_processes,
        probe_timeout_s=args.probe_timeout,
        probe_memory_mib=args.probe_memory,
        probe_user=args.probe_user,
        io_concurrency=args.io_concurrency,
        io_timeout_s=args.io_timeout,
        extensions=args.extensions,
        max_pending=args.max_pending,
        max_jobs=args.max_jobs,
        shutdown_grace_s=args.shutdown_grace,
        lame_duck_s=args.lame_duck,
        log_level=args.log_level,
        job_retention_s=args.job_retention,
        tokens=tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_watchers=args.max_watchers,
        max_watchers_per_job=args.max_watchers_per_job,
        progress_budget_per_s=args.progress_budget,
        max_health_watchers=args.max_health_watchers,
        max_streams_per_connection=args.max_streams_per_connection,
        max_errors=args.max_errors,
        max_message_bytes=args.max_message_bytes,
        metrics_listen=args.metrics_listen,
        database=args.database,
        lease_s=args.lease,
        missing_retention_s=args.missing_retention,
        purge_outside_roots=args.purge_outside_roots,
        catalog_history_s=args.catalog_history,
        watch=args.watch,
        watch_settle_s=args.watch_settle,
        poll_interval_s=args.poll_interval,
        reconcile_interval_s=args.reconcile_interval,
        http_listen=args.http_listen,
        http_cors_origins=args.http_cors_origin or (),
    )
