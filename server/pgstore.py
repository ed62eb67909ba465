"""PostgreSQL persistence shared by every replica: the schema, its migrations, the catalog.

The catalog has the same schema and the same ``Catalog`` contract as ``server.store``
(SQLite); one contract suite runs over both. Jobs and events live here too; the replicated
queue in ``server.pgqueue`` reads and writes them. Statements go through a psycopg 3 async
connection pool, so nothing blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg_pool import AsyncConnectionPool

from .catalog import (
    FileStamp,
    Seen,
    Video,
    VideoPage,
    decode_page_token,
    encode_page_token,
)
from .store import (
    VIDEO_UPSERT,
    DatabaseCorrupt,
    row_video,
    video_row,
)

__all__ = ["PgCatalog", "PgDatabase"]

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


class PgDatabase:
    """A connection pool to one PostgreSQL database, migrated and locked for this server."""

    def __init__(self, url: str, pool: AsyncConnectionPool) -> None:
        self.url = url
        self.pool = pool

    @classmethod
    async def open(cls, url: str, *, size: int = 8) -> PgDatabase:
        """Connect and migrate (replicas starting together migrate once, under a lock).

        Raises:
            DatabaseCorrupt: the schema is newer than this server, or the database is unusable.
        """
        pool = AsyncConnectionPool(url, min_size=1, max_size=size, open=False)
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await _migrate(conn)
            await pool.open(wait=True, timeout=30)
        except BaseException as exc:
            await pool.close()  # no connection left open behind a failed start
            if isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
                raise DatabaseCorrupt(f"cannot use the database: {exc}") from None
            raise
        return cls(url, pool)

    async def close(self) -> None:
        """Close the pool; idempotent."""
        await self.pool.close()


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
