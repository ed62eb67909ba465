"""PostgreSQL persistence shared by every replica: the schema, its migrations, the catalog.

The catalog has the same schema and the same ``Catalog`` contract as ``server.store``
(SQLite); one contract suite runs over both. Jobs and events live here too; the replicated
queue in ``server.pgqueue`` reads and writes them. Statements go through a psycopg 3 async
connection pool, so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from .catalog import (
    FileStamp,
    Seen,
    Video,
    VideoPage,
    decode_page_token,
    encode_page_token,
)
from .errors import DatabaseUnavailable
from .store import (
    VIDEO_UPSERT,
    DatabaseCorrupt,
    row_video,
    video_row,
)

__all__ = ["GuardedPool", "PgCatalog", "PgDatabase"]

# Any fixed number: the key of the advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x5CA4_0B5

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE videos (
        path             BYTEA PRIMARY KEY,
        size_bytes       BIGINT NOT NULL,
        mtime_ns         BIGINT NOT NULL,
        container        TEXT NOT NULL,
        duration_s       DOUBLE PRECISION,
        bit_rate         BIGINT NOT NULL,
        video_codec      TEXT NOT NULL,
        width            INTEGER NOT NULL,
        height           INTEGER NOT NULL,
        frame_rate_num   BIGINT,
        frame_rate_den   BIGINT,
        audio_codec      TEXT NOT NULL,
        audio_streams    INTEGER NOT NULL,
        subtitle_streams INTEGER NOT NULL,
        data_streams     INTEGER NOT NULL,
        first_seen_ns    BIGINT NOT NULL,
        last_seen_ns     BIGINT NOT NULL,
        job_id           TEXT NOT NULL
    );
    CREATE INDEX videos_by_job ON videos (job_id, path);
    """,
    """
    CREATE TABLE jobs (
        number     BIGSERIAL UNIQUE,
        id         TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        request_id TEXT NOT NULL,
        end_ns     BIGINT,
        snapshot   TEXT NOT NULL
    );
    CREATE INDEX jobs_by_end ON jobs (end_ns);
    CREATE TABLE job_events (
        job_id       TEXT NOT NULL,
        sequence     BIGINT NOT NULL,
        state_change BOOLEAN NOT NULL,
        snapshot     TEXT NOT NULL,
        time_ns      BIGINT,
        PRIMARY KEY (job_id, sequence)
    );
    """,
    # 3: several replicas: who runs a job, until when, and its event counter.
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until TIMESTAMPTZ;
    ALTER TABLE jobs ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false;
    CREATE INDEX jobs_claimable ON jobs (state, number);
    CREATE INDEX jobs_by_request ON jobs (request_id) WHERE request_id <> '';
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


# How long a call waits for a connection before it is DATABASE_UNAVAILABLE; and how often the
# database is probed, so that health follows it and a new pool is ready soon after it returns.
CONNECTION_WAIT_S = 0.5
PROBE_INTERVAL_S = 0.5
_POOL_SIZE = 8
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)  # PoolTimeout included
_log = logging.getLogger(__name__)


def _unavailable(exc: Exception) -> DatabaseUnavailable:
    _log.warning("the database is unavailable: %s", exc)
    return DatabaseUnavailable("the database cannot be reached; retry shortly")


class GuardedPool:
    """The connection pool as the queue and the catalog use it: a connection within
    ``CONNECTION_WAIT_S``, and a database that cannot be reached raised as
    :class:`DatabaseUnavailable` (never a wait until the caller's deadline)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for the ``async with`` block.

        Raises:
            DatabaseUnavailable: no connection in time, or it broke during the block.
        """
        try:
            async with self.pool.connection(timeout=CONNECTION_WAIT_S) as conn:
                yield conn
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc


class PgDatabase:
    """A connection pool to one PostgreSQL database, migrated and locked for this server."""

    def __init__(self, url: str, pool: AsyncConnectionPool, size: int = _POOL_SIZE) -> None:
        self.url = url
        self.pool = GuardedPool(pool)
        self._size = size
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, size: int = _POOL_SIZE) -> PgDatabase:
        """Connect and migrate (replicas starting together migrate once, under a lock).

        Raises:
            DatabaseCorrupt: the schema is newer than this server, or the database is unusable.
        """
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await _migrate(conn)
            pool = await _open_pool(url, size, timeout_s=30)
        except psycopg.Error as exc:
            raise DatabaseCorrupt(f"cannot use the database: {exc}") from None
        return cls(url, pool, size)

    def monitor(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Probe the database every ``PROBE_INTERVAL_S`` and call ``on_change(reachable)``
        when that changes; when it comes back, swap in a fresh pool (the old one would wait
        out its reconnection back-off). Runs until :meth:`close`."""
        self._monitor = asyncio.create_task(self._watch(on_change), name="pg-monitor")

    async def _watch(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        reachable, probe = True, _Probe(self.url)
        try:
            while True:
                now = await probe.ok()
                if now and not reachable:
                    now = await self._renew_pool()
                if now != reachable:
                    reachable = now
                    _log.warning("the database is %s", "reachable" if now else "unreachable")
                    await on_change(now)
                await asyncio.sleep(PROBE_INTERVAL_S)
        finally:
            await probe.close()

    async def _renew_pool(self) -> bool:
        """A fresh pool in place of the old one; False if the database is gone again."""
        try:
            fresh = await _open_pool(self.url, self._size, timeout_s=2)
        except psycopg.Error as exc:
            _log.warning("cannot reopen the connection pool: %s", exc)
            return False
        stale, self.pool.pool = self.pool.pool, fresh
        await stale.close(timeout=1.0)
        return True

    async def close(self) -> None:
        """Stop the monitor, close the pool; idempotent."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.pool.pool.close()


class _Probe:
    """One connection kept for ``SELECT 1``, opened again when it was lost."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def ok(self) -> bool:
        """True if the database answers within a second."""
        try:
            async with asyncio.timeout(1.0):
                if self._conn is None:
                    self._conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
                await self._conn.execute("SELECT 1")
        except (*_UNREACHABLE, TimeoutError):
            await self.close()
            return False
        return True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


async def _open_pool(url: str, size: int, *, timeout_s: float) -> AsyncConnectionPool:
    pool = AsyncConnectionPool(url, min_size=1, max_size=size, open=False)
    try:
        await pool.open(wait=True, timeout=timeout_s)
    except BaseException:
        await pool.close()
        raise
    return pool


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = await (await conn.execute("SELECT max(version) FROM schema_version")).fetchone()
        version = (row[0] if row else None) or 0
        if version > SCHEMA_VERSION:
            raise DatabaseCorrupt(
                f"schema version {version} is newer than this server knows ({SCHEMA_VERSION})"
            )
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version VALUES (%s)", (number,))


# The same statement as SQLite's, with psycopg's placeholders.
_UPSERT = VIDEO_UPSERT.replace("?", "%s")


class PgCatalog:
    """The :class:`server.catalog.Catalog` in the ``videos`` table."""

    def __init__(self, db: PgDatabase) -> None:
        self._pool = db.pool

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, Seen]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT path, size_bytes, mtime_ns, last_seen_ns FROM videos WHERE path = ANY(%s)",
                (list(paths),),
            )
            rows = await cursor.fetchall()
        return {bytes(p): Seen(FileStamp(s, m), seen) for p, s, m, seen in rows}

    async def commit(
        self, job_id: str, probed: Sequence[Video], seen: Sequence[bytes], now_ns: int
    ) -> None:
        rows = [video_row(v, job_id, now_ns) for v in probed]
        touched = [(now_ns, p) for p in seen]
        if not rows and not touched:
            return
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if rows:
                await cur.executemany(_UPSERT, rows)
            if touched:
                await cur.executemany(
                    "UPDATE videos SET last_seen_ns = %s WHERE path = %s", touched
                )

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage:
        after = decode_page_token(page_token) if page_token else b""
        sql = (
            "SELECT * FROM videos WHERE path > %s AND path >= %s"
            " AND substring(path FROM 1 FOR %s) = %s AND (%s = '' OR job_id = %s)"
            " ORDER BY path LIMIT %s"
        )
        args = (after, path_prefix, len(path_prefix), path_prefix, job_id, job_id, page_size + 1)
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(sql, args)).fetchall()
        videos = [row_video(tuple(r)) for r in rows]
        page = videos[:page_size]
        return page, encode_page_token(page[-1].path) if len(videos) > page_size else ""

    async def close(self) -> None:
        """Nothing of its own to close: the :class:`PgDatabase` is closed by its owner."""
