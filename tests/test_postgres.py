"""The PostgreSQL backend beyond the shared contract suites: schema versions, errors, and
the polling safety net under NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
import pytest

from scanjobs.server import pgstore
from scanjobs.server.errors import DatabaseUnavailable, ShuttingDown, Unavailable
from scanjobs.server.jobs import JobSpec, JobState
from scanjobs.server.pgqueue import ClusterConfig, PgJobQueue
from scanjobs.server.pgstore import PgCatalog, PgDatabase
from scanjobs.server.queue import QueueConfig
from scanjobs.server.store import DatabaseCorrupt
from tests.queues import ScriptedHandler, until_state


async def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    first, second = await PgDatabase.open(postgres_url), await PgDatabase.open(postgres_url)
    await first.close()
    await second.close()
    with psycopg.connect(postgres_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 3, 4, 5, 6, 7]


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


async def test_a_cancel_whose_notification_is_lost_is_found_by_the_lease_renewal(
    postgres_url: str,
) -> None:
    db = await PgDatabase.open(postgres_url)
    handler = ScriptedHandler()
    queue = PgJobQueue(handler, db, QueueConfig(), ClusterConfig(lease_s=3.0, poll_s=0.2))
    await queue.start()
    try:
        job = await queue.submit(JobSpec("/block"))
        await handler.started_event(job.id).wait()
        # A cancel without NOTIFY, from a thread: a blocking call on the event loop would
        # wait for a row lock that the queue's own transaction there holds.
        await asyncio.to_thread(_flag_cancel, postgres_url, job.id)
        final = await until_state(queue, job.id, JobState.CANCELLED)
    finally:
        await queue.close(grace_s=1.0)
        await db.close()
    assert final.cancel_requested
    assert handler.cancelled == [job.id]


async def test_a_catalog_from_before_reconciliation_is_migrated(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for number, script in enumerate(pgstore._MIGRATIONS[:3], start=1):
            conn.execute(script)  # type: ignore[call-overload]
            conn.execute("INSERT INTO schema_version VALUES (%s)", (number,))
        conn.execute(
            "INSERT INTO videos VALUES (%s, 10, 1, 'mov', 1.0, 1000, 'h264', 64, 48, 25, 1,"
            " '', 0, 0, 0, 100, 100, 'j0')",
            (b"/m/s/a.mp4",),
        )
    db = await PgDatabase.open(postgres_url)
    catalog = PgCatalog(db)
    rows = await catalog.read_directory(b"/m/s")
    above = await catalog.read_directory(b"/m")
    await db.close()
    assert list(rows.videos) == [b"/m/s/a.mp4"]
    assert above.subdirs == {b"/m/s"}


def _flag_cancel(postgres_url: str, job_id: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s", (job_id,))


async def test_a_watch_that_loses_the_database_ends_with_database_unavailable(
    postgres_url: str,
) -> None:
    db = await PgDatabase.open(postgres_url)
    handler = ScriptedHandler()
    queue = PgJobQueue(handler, db, QueueConfig(), ClusterConfig(lease_s=5.0, poll_s=0.1))
    await queue.start()
    outage: asyncio.Task[None] | None = None
    try:
        job = await queue.submit(JobSpec("/block"))
        await handler.started_event(job.id).wait()
        subscription = await queue.watch(job.id)
        await anext(subscription)

        outage = asyncio.create_task(_cut_connections_until_cancelled(postgres_url))
        with pytest.raises(Unavailable) as ended:
            async with asyncio.timeout(60):
                await anext(subscription)
    finally:
        if outage is not None:
            outage.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await outage
        handler.release.set()
        await queue.close(grace_s=1.0)
        await db.close()
    assert isinstance(ended.value, DatabaseUnavailable)
    assert not isinstance(ended.value, ShuttingDown)
    assert ended.value.reason == "DATABASE_UNAVAILABLE"


async def test_a_queue_closed_while_it_listens_again_closes_the_new_connection(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await PgDatabase.open(postgres_url)
    queue = PgJobQueue(ScriptedHandler(), db, QueueConfig(), ClusterConfig(poll_s=0.05))
    await queue.start()
    listening: list[psycopg.AsyncConnection[Any]] = []
    stuck = asyncio.Event()
    real_execute = psycopg.AsyncConnection.execute

    async def execute(self: psycopg.AsyncConnection[Any], query: Any, *args: Any) -> Any:
        if isinstance(query, str) and query.startswith("LISTEN"):
            listening.append(self)
            stuck.set()
            await asyncio.Event().wait()  # the database never answers the LISTEN
        return await real_execute(self, query, *args)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", execute)
    try:
        await asyncio.to_thread(_terminate_others, postgres_url)  # the listener is lost
        async with asyncio.timeout(30):
            await stuck.wait()
    finally:
        await queue.close(grace_s=1.0)
        await db.close()
    assert listening
    assert all(conn.closed for conn in listening)


async def _cut_connections_until_cancelled(postgres_url: str) -> None:
    """An outage as the queue sees it: each of its connections is cut, again and again."""
    while True:
        await asyncio.to_thread(_terminate_others, postgres_url)
        await asyncio.sleep(0.05)


def _terminate_others(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
