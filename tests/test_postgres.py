"""The PostgreSQL backend beyond the shared contract suites: schema versions, and errors."""

from __future__ import annotations

import psycopg
import pytest

from server.pgstore import PgDatabase
from server.store import DatabaseCorrupt


async def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    first, second = await PgDatabase.open(postgres_url), await PgDatabase.open(postgres_url)
    await first.close()
    await second.close()
    with psycopg.connect(postgres_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 3]


async def test_a_schema_from_a_newer_server_is_refused(postgres_url: str) -> None:
    db = await PgDatabase.open(postgres_url)
    await db.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(DatabaseCorrupt, match="newer"):
        await PgDatabase.open(postgres_url)


async def test_an_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseCorrupt, match="cannot use the database"):
        await PgDatabase.open("postgresql://postgres@127.0.0.1:9/none?connect_timeout=2")
