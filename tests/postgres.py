"""A real PostgreSQL for the tests: initdb into a temporary folder, a free loopback port.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user. Where
no PostgreSQL is installed the tests that need it are skipped with one clear message;
``.ci/run`` installs Debian's ``postgresql`` so that CI never skips them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bench.harness import free_port


def _bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]) if candidates else None


@dataclass
class Postgres:
    """A running cluster; :meth:`new_database` gives each test a database of its own;
    :meth:`stop` and :meth:`start` make an outage."""

    port: int
    data: Path | None = None
    options: str = ""
    log: Path | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are ended, connections refused until start."""
        _pg_ctl(self, "-m", "fast", "-w", "stop")

    def start(self) -> None:
        """``pg_ctl start``, on the same port; returns once it accepts connections."""
        assert self.log is not None
        _pg_ctl(self, "-o", self.options, "-l", str(self.log), "-w", "start")


def _pg_ctl(cluster: Postgres, *args: str) -> None:
    bin_dir = _bin_dir()
    assert bin_dir is not None and cluster.data is not None
    subprocess.run(
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(cluster.data), *args]),
        check=True, capture_output=True,
    )  # fmt: skip


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def available() -> bool:
    """True where a PostgreSQL server can be started here."""
    return _bin_dir() is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)


@contextlib.contextmanager
def running_cluster() -> Iterator[Postgres]:
    """Start PostgreSQL in a temporary folder on a free loopback port; stop and remove it."""
    bin_dir = _bin_dir()
    assert bin_dir is not None
    folder = Path(tempfile.mkdtemp(prefix="scanjobs-pg-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True,
    )  # fmt: skip
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    )
    subprocess.run(
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                      str(folder / "log"), "-w", "start"]),
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield Postgres(port, data, options, folder / "log")
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False, capture_output=True,
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Postgres]:
    """PostgreSQL for the whole session."""
    if not available():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def private_postgres() -> Iterator[Postgres]:
    """A cluster of the test's own, that it may stop and start."""
    if not available():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: Postgres) -> str:
    """A fresh, empty database on the session's cluster."""
    return postgres_cluster.new_database()
