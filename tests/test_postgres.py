"""The PostgreSQL backend beyond the shared contract suites: one server per database,
schema versions, and a real server process on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from server.pgstore import PgDatabase
from server.store import DatabaseCorrupt, DatabaseInUse
from tests.conftest import SERVER, ServerProcess
from tests.media import write_video


async def test_a_second_server_on_the_same_database_is_refused(postgres_url: str) -> None:
    first = await PgDatabase.open(postgres_url)
    try:
        with pytest.raises(DatabaseInUse):
            await PgDatabase.open(postgres_url)
    finally:
        await first.close()
    again = await PgDatabase.open(postgres_url)  # released with the first server
    await again.close()


async def test_a_schema_from_a_newer_server_is_refused(postgres_url: str) -> None:
    db = await PgDatabase.open(postgres_url)
    await db.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(DatabaseCorrupt, match="newer"):
        await PgDatabase.open(postgres_url)


async def test_an_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseCorrupt, match="cannot connect"):
        await PgDatabase.open("postgresql://postgres@127.0.0.1:9/none?connect_timeout=2")


def test_server_scans_into_postgres(postgres_url: str, tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    write_video(root / "a.mp4")
    server = ServerProcess("--root", str(root), "--database", postgres_url)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "client", "--target", server.address, "--json", "scan",
             str(root)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        second = subprocess.run(
            [*SERVER, "--root", str(root), "--database", postgres_url, "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        code, _ = server.stop()
    assert code == 0
    assert '"JOB_STATE_COMPLETED"' in out.stdout.splitlines()[-1], out.stderr
    assert second.returncode == 3
    assert "in use by another scanjobs server" in second.stderr
    with psycopg.connect(postgres_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM videos").fetchone()  # type: ignore[misc]
    assert count == 1
