"""Server settings from command-line flags, each also readable from ``SCANJOBS_<NAME>``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.scan import DEFAULT_EXTENSIONS

__all__ = ["Config", "parse_args"]


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server needs to start; see ``--help`` for each field's meaning."""

    listen: str
    roots: tuple[str, ...]
    data_dir: Path
    workers: int
    job_timeout_s: float
    probe_processes: int
    probe_timeout_s: float
    extensions: frozenset[str]
    max_pending: int
    shutdown_grace_s: float
    log_level: str
    job_retention_s: float = 7 * 24 * 3600.0


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SCANJOBS_{name}", default)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _extensions(text: str) -> frozenset[str]:
    items = {e.strip().lower() for e in text.split(",") if e.strip()}
    if not items:
        raise argparse.ArgumentTypeError("at least one extension is required")
    return frozenset(e if e.startswith(".") else f".{e}" for e in items)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scanjobs-server",
        description="Serve the scanjobs.v1.ScanService gRPC API. Every flag can also be set "
        "with an environment variable SCANJOBS_<FLAG> (e.g. SCANJOBS_LISTEN); --root takes "
        "a colon-separated list there.",
    )
    cpus = os.cpu_count() or 1
    p.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:50051"),
        help="address:port to serve on (default %(default)s)",
    )
    p.add_argument(
        "--root",
        action="append",
        dest="roots",
        metavar="DIR",
        help="allowed scan root, absolute; repeatable; required",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", ".data")),
        help="where the catalog database lives (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=_env("WORKERS", "2"),
        help="jobs running at once (default %(default)s)",
    )
    p.add_argument(
        "--job-timeout",
        type=_positive_float,
        dest="job_timeout_s",
        default=_env("JOB_TIMEOUT", "3600"),
        help="seconds a job may run unless its request says otherwise (default %(default)s)",
    )
    p.add_argument(
        "--probe-processes",
        type=_positive_int,
        default=_env("PROBE_PROCESSES", str(cpus)),
        help="probe worker processes (default: CPU count, %(default)s)",
    )
    p.add_argument(
        "--probe-timeout",
        type=_positive_float,
        dest="probe_timeout_s",
        default=_env("PROBE_TIMEOUT", "30"),
        help="seconds one file may take to probe (default %(default)s)",
    )
    p.add_argument(
        "--extensions",
        type=_extensions,
        default=_env("EXTENSIONS", ",".join(sorted(DEFAULT_EXTENSIONS))),
        help="comma-separated video file extensions (default %(default)s)",
    )
    p.add_argument(
        "--max-pending",
        type=_positive_int,
        default=_env("MAX_PENDING", "1000"),
        help="pending jobs accepted before RESOURCE_EXHAUSTED (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=_positive_float,
        dest="shutdown_grace_s",
        default=_env("SHUTDOWN_GRACE", "10"),
        help="seconds to drain on SIGTERM before stopping hard (default %(default)s)",
    )
    p.add_argument(
        "--job-retention",
        type=_positive_float,
        dest="job_retention_s",
        default=_env("JOB_RETENTION", str(7 * 24 * 3600)),
        help="seconds an ended job is kept before it is pruned; the catalog is never pruned "
        "(default %(default)s = 7 days)",
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default %(default)s)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags (falling back to the environment); exits with usage on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    roots = args.roots or [r for r in _env("ROOT", "").split(":") if r]
    if not roots:
        parser.error("at least one --root (or SCANJOBS_ROOT) is required")
    for root in roots:
        if not os.path.isabs(root):
            parser.error(f"--root must be an absolute path: {root}")
    return Config(
        listen=args.listen,
        roots=tuple(roots),
        data_dir=args.data_dir,
        workers=args.workers,
        job_timeout_s=args.job_timeout_s,
        probe_processes=args.probe_processes,
        probe_timeout_s=args.probe_timeout_s,
        extensions=args.extensions,
        max_pending=args.max_pending,
        shutdown_grace_s=args.shutdown_grace_s,
        log_level=args.log_level,
        job_retention_s=args.job_retention_s,
    )
