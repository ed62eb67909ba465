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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from .catalog import (
    DirectoryChanges,
    DirectoryRows,
    FailurePage,
    Known,
    Listing,
    ScanCounts,
    VideoPage,
    ancestors,
    below,
    decode_page_token,
    encode_page_token,
    parent_dir,
)
from .catalog_sql import (
    COUNTS_UPSERT,
    DIRECTORY_READS,
    FAILURE_COLUMNS,
    KNOWN_COLUMNS,
    SETTLED_READ,
    SUMMARY_SCHEMA,
    UNSETTLE_ALL,
    changes_query,
    commit_steps,
    counts_row,
    directory_rows,
    listing,
    logs_changes,
    pg,
    removal_log,
    row_change,
    row_failure,
    row_known,
    row_video,
    settled,
    settled_rows,
)
from .changes import ChangeFeed, VideoChange, check_history
from .errors import DatabaseUnavailable
from .store import DatabaseCorrupt

__all__ = ["GuardedPool", "PgCatalog", "PgDatabase"]


# Any fixed number: the key of the advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x5CA4_0B5
# The key of the advisory lock that a commit logging changes holds until it commits: the
# change log's sequence is taken under it, so changes commit in sequence order and a reader
# that has seen sequence N has seen every change before N.
_CHANGES_LOCK = 0x5CA4_0C6
CHANNEL = "scanjobs_catalog"
_HISTORY = (
    "SELECT pruned_through,"
    " greatest(coalesce((SELECT max(sequence) FROM video_changes), 0), pruned_through)"
    " FROM catalog_history"
)

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
    # 4: reconciliation, as SQLite's migration 4; the directories are filled in by
    # _backfill_directories.
    """
    ALTER TABLE videos ADD COLUMN dir BYTEA NOT NULL DEFAULT '';
    ALTER TABLE videos ADD COLUMN device BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE videos ADD COLUMN inode BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE videos ADD COLUMN missing_ns BIGINT;
    CREATE INDEX videos_by_dir ON videos (dir);
    CREATE INDEX videos_by_identity ON videos (device, inode);
    CREATE INDEX videos_missing ON videos (missing_ns) WHERE missing_ns IS NOT NULL;
    CREATE TABLE file_errors (
        path       BYTEA PRIMARY KEY,
        dir        BYTEA NOT NULL,
        size_bytes BIGINT NOT NULL,
        mtime_ns   BIGINT NOT NULL,
        message    TEXT NOT NULL,
        job_id     TEXT NOT NULL,
        time_ns    BIGINT NOT NULL
    );
    CREATE INDEX file_errors_by_dir ON file_errors (dir);
    CREATE TABLE catalog_dirs (
        path   BYTEA PRIMARY KEY,
        parent BYTEA NOT NULL
    );
    CREATE INDEX catalog_dirs_by_parent ON catalog_dirs (parent);
    CREATE TABLE job_counts (
        job_id    TEXT PRIMARY KEY,
        added     BIGINT NOT NULL,
        updated   BIGINT NOT NULL,
        unchanged BIGINT NOT NULL,
        moved     BIGINT NOT NULL,
        restored  BIGINT NOT NULL,
        failed    BIGINT NOT NULL,
        removed   BIGINT NOT NULL,
        time_ns   BIGINT NOT NULL
    );
    """,
    # 5: the change log (see server.changes), as SQLite's migration 5.
    """
    CREATE TABLE video_changes (
        sequence         BIGSERIAL PRIMARY KEY,
        kind             SMALLINT NOT NULL,
        previous_path    BYTEA,
        time_ns          BIGINT NOT NULL,
        path             BYTEA NOT NULL,
        size_bytes BIGINT, mtime_ns BIGINT, container TEXT, duration_s DOUBLE PRECISION,
        bit_rate BIGINT, video_codec TEXT, width INTEGER, height INTEGER,
        frame_rate_num BIGINT, frame_rate_den BIGINT, audio_codec TEXT,
        audio_streams INTEGER, subtitle_streams INTEGER, data_streams INTEGER,
        first_seen_ns BIGINT, last_seen_ns BIGINT, job_id TEXT, dir BYTEA,
        device BIGINT, inode BIGINT, missing_ns BIGINT
    );
    CREATE INDEX video_changes_by_time ON video_changes (time_ns);
    CREATE TABLE catalog_history (pruned_through BIGINT NOT NULL);
    INSERT INTO catalog_history VALUES (0);
    """,
    # 6: the leader's view of the roots, for ListRoots on every replica (server.shared_roots).
    """
    CREATE TABLE root_states (
        path TEXT PRIMARY KEY, mode TEXT NOT NULL, reason TEXT NOT NULL,
        last_reconcile_ns BIGINT
    );
    """,
    # 7: each catalogued directory's summary (server.catalog.Summary).
    SUMMARY_SCHEMA,
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
    async def attach(cls, url: str) -> PgDatabase:
        """One connection to the database a server already opened (and migrated), for a
        scan worker of that server. It is checked before each use, so that after an outage
        the worker connects afresh instead of failing on the connection the outage broke."""
        try:
            pool = AsyncConnectionPool(
                url, min_size=1, max_size=1, open=False,
                check=AsyncConnectionPool.check_connection,
            )  # fmt: skip
            await pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {exc}") from None
        return cls(url, pool, 1)

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
            if number == 4:
                await _backfill_directories(conn)
            await conn.execute("INSERT INTO schema_version VALUES (%s)", (number,))


async def _backfill_directories(conn: psycopg.AsyncConnection[Any]) -> None:
    """Each catalogued video's directory, and every catalogued directory with its parent."""
    rows = await (await conn.execute("SELECT path FROM videos")).fetchall()
    dirs = {bytes(path): parent_dir(bytes(path)) for (path,) in rows}
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE videos SET dir = %s WHERE path = %s", [(d, p) for p, d in dirs.items()]
        )
        chain = {pair for d in set(dirs.values()) for pair in ancestors(d)}
        await cur.executemany(
            "INSERT INTO catalog_dirs VALUES (%s, %s) ON CONFLICT DO NOTHING", sorted(chain)
        )


class PgCatalog:
    """The :class:`server.catalog.Catalog` in the same tables as SQLite's."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._pool = db.pool
        self._feed = ChangeFeed()
        self._listening: asyncio.Task[None] | None = None

    @property
    def feed(self) -> ChangeFeed:
        return self._feed

    async def listen(self) -> None:
        """Wake :attr:`feed` when any replica commits changes (``NOTIFY``), from now on."""
        self._listening = asyncio.create_task(self._dispatch(), name="pg-changes")

    async def _dispatch(self) -> None:
        """Wake the feed on each notification; reconnect when the connection drops (the
        followers poll meanwhile, and are woken once listening again)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._db.url, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._feed.wake()  # whatever was committed while nobody listened
                    async for _ in conn.notifies():
                        self._feed.wake()
            except psycopg.Error as exc:
                _log.warning("catalog change notifications lost; reconnecting: %s", exc)
            await asyncio.sleep(1.0)

    async def _fetch(self, sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        async with self._pool.connection() as conn:
            return await (await conn.execute(pg(sql), args)).fetchall()

    async def read_directory(
        self, directory: bytes, digest: bytes = b"", fresh_after_ns: int = 0
    ) -> DirectoryRows:
        async with self._pool.connection() as conn:
            if digest:  # most directories of a rescan: one round trip
                found = await (await conn.execute(_SETTLED_READ, (directory,) * 3)).fetchall()
                if (rows := settled_rows(found, digest, fresh_after_ns)) is not None:
                    return rows
            state = await (await conn.execute(_DIRECTORY_READS[0], (directory,))).fetchone()
            reads = [await (await conn.execute(sql, (directory,))).fetchall() for sql in _READS]
        return directory_rows(state, settled(state, digest, fresh_after_ns), *reads)

    async def find_identities(self, identities: Sequence[tuple[int, int]]) -> list[Known]:
        if not identities:
            return []
        rows = await self._fetch(
            f"SELECT {KNOWN_COLUMNS} FROM videos WHERE (device, inode) IN"  # noqa: S608 - constant
            " (SELECT * FROM unnest(?::bigint[], ?::bigint[]))",
            ([d for d, _ in identities], [i for _, i in identities]),
        )
        return [row_known(r) for r in rows]

    async def live_below(self, directory: bytes, device: int) -> tuple[int, int]:
        rows = await self._fetch(
            "SELECT count(*), count(*) FILTER (WHERE device = ?) FROM videos"
            " WHERE path >= ? AND path < ? AND missing_ns IS NULL",
            (device, *below(directory)),
        )
        return rows[0][0], rows[0][1]

    async def commit(self, changes: DirectoryChanges) -> ScanCounts:
        steps = commit_steps(changes)
        counters: dict[str, int] = {}
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if logs_changes(steps):
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_CHANGES_LOCK,))
            for step in steps:
                await cur.executemany(pg(step.sql), step.rows)  # rowcount: the sum over rows
                if step.counter:
                    touched = max(cur.rowcount, 0)
                    counters[step.counter] = counters.get(step.counter, 0) + touched
            counts, row = counts_row(changes, counters)
            await cur.execute(pg(COUNTS_UPSERT), row)
            if counters.get("logged"):
                await cur.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        if counters.get("logged"):
            self._feed.wake()
        return counts

    async def job_counts(self, job_id: str) -> ScanCounts:
        rows = await self._fetch(
            "SELECT added, updated, unchanged, moved, restored, failed, removed"
            " FROM job_counts WHERE job_id = ?",
            (job_id,),
        )
        return ScanCounts(*rows[0]) if rows else ScanCounts()

    async def list_videos(
        self,
        *,
        path_prefix: bytes,
        job_id: str,
        page_size: int,
        page_token: str,
        include_missing: bool = False,
        roots: Sequence[bytes] = (),
    ) -> VideoPage:
        page, token, _ = await self.catalog_listing(
            path_prefix=path_prefix, job_id=job_id, page_size=page_size,
            page_token=page_token, include_missing=include_missing, roots=roots,
        )  # fmt: skip
        return page, token

    async def catalog_listing(
        self,
        *,
        path_prefix: bytes,
        job_id: str,
        page_size: int,
        page_token: str,
        include_missing: bool = False,
        roots: Sequence[bytes] = (),
    ) -> Listing:
        after = decode_page_token(page_token) if page_token else b""
        extra = " AND (?::text = '' OR job_id = ?)" + (
            "" if include_missing else " AND missing_ns IS NULL"
        )
        sql, args = listing(
            "videos", "*", after=after, path_prefix=path_prefix, roots=roots, extra=extra
        )
        sql = pg(sql.replace("substr(", "substring("))
        async with self._pool.connection() as conn, conn.transaction():
            # One snapshot for the page and its sequence.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = await (
                await conn.execute(sql, [*args, job_id, job_id, page_size + 1])
            ).fetchall()
            history = await (await conn.execute(_HISTORY)).fetchone()
        videos = [row_video(r) for r in rows]
        page = videos[:page_size]
        token = encode_page_token(page[-1].path) if len(videos) > page_size else ""
        return page, token, int(history[1]) if history else 0

    async def changes_after(self, after: int, path_prefix: bytes, limit: int) -> list[VideoChange]:
        sql, args = changes_query(path_prefix)
        sql = pg(sql.replace("substr(", "substring("))
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = await (await conn.execute(sql, [after, *args, limit])).fetchall()
            history = await (await conn.execute(_HISTORY)).fetchone()
        pruned, high = history if history else (0, 0)
        check_history(after, pruned_through=pruned, high_water=high)
        return [row_change(r) for r in rows]

    async def prune_changes(self, before_ns: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT max(sequence) FROM video_changes WHERE time_ns < %s", (before_ns,)
            )
            row = await cursor.fetchone()
            if row is None or row[0] is None:
                return 0
            deleted = await conn.execute(
                "DELETE FROM video_changes WHERE sequence <= %s", (row[0],)
            )
            await conn.execute(
                "UPDATE catalog_history SET pruned_through = greatest(pruned_through, %s)",
                (row[0],),
            )
            return deleted.rowcount

    async def list_failures(
        self, *, path_prefix: bytes, page_size: int, page_token: str, roots: Sequence[bytes] = ()
    ) -> FailurePage:
        after = decode_page_token(page_token) if page_token else b""
        sql, args = listing(
            "file_errors", FAILURE_COLUMNS, after=after, path_prefix=path_prefix, roots=roots
        )
        rows = await self._fetch(sql.replace("substr(", "substring("), [*args, page_size + 1])
        failures = [row_failure(r) for r in rows]
        page = failures[:page_size]
        return page, encode_page_token(page[-1].path) if len(failures) > page_size else ""

    async def purge_missing(self, before_ns: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute("DELETE FROM videos WHERE missing_ns < %s", (before_ns,))
            if cursor.rowcount:  # every job starts here: the prune reads every directory's row
                await conn.execute(_PRUNE_DIRS)
            await conn.execute("DELETE FROM job_counts WHERE time_ns < %s", (before_ns,))
            return cursor.rowcount

    async def purge_outside(self, roots: Sequence[bytes]) -> int:
        keep = " OR ".join("(path >= %s AND path < %s)" for _ in roots) or "true"
        args = [bound for root in roots for bound in below(root)]
        count = 0
        now = time.time_ns()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHANGES_LOCK,))
            await conn.execute(pg(removal_log(keep.replace("%s", "?"))), [now, now, *args])
            await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            for table in ("videos", "file_errors"):
                sql = f"DELETE FROM {table} WHERE NOT ({keep})"  # noqa: S608 - names are ours
                count += (await conn.execute(sql, args)).rowcount
            await conn.execute(_PRUNE_DIRS)
            await conn.execute(UNSETTLE_ALL)
        return count

    async def close(self) -> None:
        """Stop listening; the :class:`PgDatabase` is closed by its owner."""
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)


_DIRECTORY_READS = tuple(pg(sql) for sql in DIRECTORY_READS)
_READS, _SETTLED_READ = _DIRECTORY_READS[1:], pg(SETTLED_READ)
# Directories with nothing catalogued below them any more (after a purge of tombstones).
_PRUNE_DIRS = """
DELETE FROM catalog_dirs d WHERE NOT EXISTS (SELECT 1 FROM videos v
    WHERE v.path > d.path || '\\x2f'::bytea AND v.path < d.path || '\\x30'::bytea)
AND NOT EXISTS (SELECT 1 FROM file_errors f
    WHERE f.path > d.path || '\\x2f'::bytea AND f.path < d.path || '\\x30'::bytea)
"""
