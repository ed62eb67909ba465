"""PostgreSQL persistence: the catalog and the job store on one shared database.

The same schema and the same ``Catalog`` and ``JobStore`` contracts as ``server.store``
(SQLite); one contract suite runs over both. Statements go through a psycopg 3 async
connection pool, so nothing blocks the event loop.

Until jobs are claimed row by row (``FOR UPDATE SKIP LOCKED`` with leases), one server per
database: :meth:`PgDatabase.open` takes a session-level advisory lock and refuses to start
when another server holds it, exactly as the SQLite data-dir lock does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.catalog import (
    FileStamp,
    Seen,
    Video,
    VideoPage,
    decode_page_token,
    encode_page_token,
)
from server.jobs import JobEvent
from server.queue import StoredJob
from server.store import (
    DatabaseCorrupt,
    DatabaseInUse,
    decode_job,
    encode_job,
    event_from_row,
    row_video,
    time_ns,
    video_row,
)

__all__ = ["PgCatalog", "PgDatabase", "PgJobStore"]

# Any fixed number: the key of the "one server per database" advisory lock.
_SERVER_LOCK = 0x5CA4_0B5

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
)
SCHEMA_VERSION = len(_MIGRATIONS)


class PgDatabase:
    """A connection pool to one PostgreSQL database, migrated and locked for this server."""

    def __init__(self, pool: AsyncConnectionPool, lock: psycopg.AsyncConnection[Any]) -> None:
        self.pool = pool
        self._lock = lock

    @classmethod
    async def open(cls, url: str, *, size: int = 4) -> PgDatabase:
        """Connect, migrate, and take the one-server lock.

        Raises:
            DatabaseInUse: another server uses this database.
            DatabaseCorrupt: the schema is newer than this server, or the database is unusable.
        """
        try:
            lock = await psycopg.AsyncConnection.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseCorrupt(f"cannot connect to the database: {exc}") from None
        try:
            row = await (
                await lock.execute("SELECT pg_try_advisory_lock(%s)", (_SERVER_LOCK,))
            ).fetchone()
            if not row or not row[0]:
                raise DatabaseInUse("the database is in use by another scanjobs server")
            await _migrate(lock)
            pool = AsyncConnectionPool(url, min_size=1, max_size=size, open=False)
            await pool.open(wait=True)
        except BaseException:
            await lock.close()
            raise
        return cls(pool, lock)

    async def close(self) -> None:
        """Close the pool and release the lock; idempotent."""
        await self.pool.close()
        await self._lock.close()


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SERVER_LOCK + 1,))
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


_UPSERT = """
INSERT INTO videos VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)
ON CONFLICT (path) DO UPDATE SET
    size_bytes = excluded.size_bytes, mtime_ns = excluded.mtime_ns,
    container = excluded.container, duration_s = excluded.duration_s,
    bit_rate = excluded.bit_rate, video_codec = excluded.video_codec,
    width = excluded.width, height = excluded.height,
    frame_rate_num = excluded.frame_rate_num, frame_rate_den = excluded.frame_rate_den,
    audio_codec = excluded.audio_codec, audio_streams = excluded.audio_streams,
    subtitle_streams = excluded.subtitle_streams, data_streams = excluded.data_streams,
    last_seen_ns = excluded.last_seen_ns, job_id = excluded.job_id
"""


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


class PgJobStore:
    """The :class:`server.queue.JobStore` in the ``jobs`` and ``job_events`` tables."""

    def __init__(self, db: PgDatabase) -> None:
        self._pool = db.pool

    async def load(self) -> list[StoredJob]:
        async with self._pool.connection() as conn:
            jobs = await (
                await conn.execute("SELECT id, snapshot FROM jobs ORDER BY number")
            ).fetchall()
            last = await (
                await conn.execute(
                    "SELECT DISTINCT ON (job_id) job_id, sequence, state_change, snapshot, time_ns"
                    " FROM job_events ORDER BY job_id, sequence DESC"
                )
            ).fetchall()
        by_job = {r[0]: r[1:] for r in last}
        loaded = []
        for job_id, snapshot in jobs:
            job = decode_job(snapshot)
            row = by_job.get(job_id)
            event = event_from_row(row) if row else JobEvent(0, job, True)
            loaded.append(StoredJob(job, event))
        return loaded

    async def append(self, events: Sequence[JobEvent]) -> None:
        event_rows = [
            (e.job.id, e.sequence, e.state_change, encode_job(e.job), time_ns(e.time))
            for e in events
        ]
        latest = {e.job.id: e.job for e in events}
        job_rows = [
            (j.id, j.state.value, j.spec.request_id, time_ns(j.end_time), encode_job(j))
            for j in latest.values()
        ]
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO jobs (id, state, request_id, end_ns, snapshot)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " state = excluded.state, end_ns = excluded.end_ns, snapshot = excluded.snapshot",
                job_rows,
            )
            await cur.executemany(
                "INSERT INTO job_events VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                event_rows,
            )

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT sequence, state_change, snapshot, time_ns FROM job_events"
                    " WHERE job_id = %s AND sequence > %s ORDER BY sequence",
                    (job_id, after_sequence),
                )
            ).fetchall()
        return [event_from_row(tuple(r)) for r in rows]

    async def thin(self, job_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "DELETE FROM job_events WHERE job_id = %s AND NOT state_change", (job_id,)
            )

    async def prune(self, ended_before: datetime) -> list[str]:
        async with self._pool.connection() as conn, conn.transaction():
            rows = await (
                await conn.execute(
                    "DELETE FROM jobs WHERE end_ns < %s RETURNING id", (time_ns(ended_before),)
                )
            ).fetchall()
            ids = [r[0] for r in rows]
            await conn.execute("DELETE FROM job_events WHERE job_id = ANY(%s)", (ids,))
        return ids
