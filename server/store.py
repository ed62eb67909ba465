"""SQLite persistence, the embedded default: the catalog, the jobs and their events in one file.

One :class:`Database` owns one connection and one thread: every statement runs there, so the
event loop never blocks on SQLite and writes are serialised without locks of our own. The
schema is created and migrated by the server itself (``PRAGMA user_version``); WAL mode lets
readers and the writer overlap. The catalog is here; the job store is ``server.store_jobs``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import chain
from pathlib import Path
from typing import BinaryIO, TypeVar

from .catalog import (
    DirectoryChanges,
    DirectoryRows,
    Failure,
    FailurePage,
    Known,
    ScanCounts,
    VideoPage,
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
    commit_steps,
    counts_row,
    directory_rows,
    listing,
    removal_log,
    row_failure,
    settled,
    settled_rows,
)
from .changes import ChangeFeed
from .errors import StorageFault, StorageFull, StorageIOError
from .store_changes import CHANGES_SCHEMA, SqliteChanges

__all__ = [
    "Database",
    "DatabaseCorrupt",
    "DatabaseInUse",
    "SqliteCatalog",
]

_T = TypeVar("_T")

# Identities looked up per statement (two parameters each, far below SQLite's limit).
_IDENTITIES_PER_QUERY = 250
_KNOWN_IN_V = ", ".join(f"v.{c.strip()}" for c in KNOWN_COLUMNS.split(","))


_BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another process's write lock
# Between the tries of Database.write: short while a commit may be ending, longer once the
# lock has been held for a while (a long transaction, not a commit's last milliseconds).
_BUSY_STEP_S, _BUSY_LONG_STEP_S, _BUSY_LONG_AFTER_S = 0.0005, 0.005, 0.05
# The commit that takes the write-ahead log past this many pages copies it into the database
# and syncs it to disk, within the commit: 5 to 20 ms on the project's machine. The scan
# workers' connections keep SQLite's 1,000 pages, so during scans (nearly all writing) they do
# it; the server's own connection, whose writes the job's events wait for (a cancel's terminal
# event among them), does it only when it wrote this much alone (40 MB of 4 KiB pages).
_SERVER_CHECKPOINT_PAGES = 10_000


class DatabaseCorrupt(RuntimeError):
    """The database file exists but cannot be used; the server must not start on it."""


class DatabaseInUse(RuntimeError):
    """Another server process holds the database: two must never share one SQLite file."""


_MIGRATIONS: tuple[str, ...] = (
    # 1: the catalog.
    """
    CREATE TABLE videos (
        path             BLOB PRIMARY KEY,
        size_bytes       INTEGER NOT NULL,
        mtime_ns         INTEGER NOT NULL,
        container        TEXT NOT NULL,
        duration_s       REAL,
        bit_rate         INTEGER NOT NULL,
        video_codec      TEXT NOT NULL,
        width            INTEGER NOT NULL,
        height           INTEGER NOT NULL,
        frame_rate_num   INTEGER,
        frame_rate_den   INTEGER,
        audio_codec      TEXT NOT NULL,
        audio_streams    INTEGER NOT NULL,
        subtitle_streams INTEGER NOT NULL,
        data_streams     INTEGER NOT NULL,
        first_seen_ns    INTEGER NOT NULL,
        last_seen_ns     INTEGER NOT NULL,
        job_id           TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX videos_by_job ON videos (job_id, path);
    """,
    # 2: jobs and their event history; rowid keeps submission order.
    """
    CREATE TABLE jobs (
        id         TEXT NOT NULL UNIQUE,
        state      TEXT NOT NULL,
        request_id TEXT NOT NULL,
        end_ns     INTEGER,
        snapshot   TEXT NOT NULL
    );
    CREATE INDEX jobs_by_end ON jobs (end_ns);
    CREATE TABLE job_events (
        job_id       TEXT NOT NULL,
        sequence     INTEGER NOT NULL,
        state_change INTEGER NOT NULL,
        snapshot     TEXT NOT NULL,
        PRIMARY KEY (job_id, sequence)
    ) WITHOUT ROWID;
    """,
    # 3: when each event was published.
    """
    ALTER TABLE job_events ADD COLUMN time_ns INTEGER;
    """,
    # 4: reconciliation: each video's directory and identity, tombstones, remembered
    # failures, the catalogued directories, and each job's counts committed with its rows.
    """
    ALTER TABLE videos ADD COLUMN dir BLOB NOT NULL DEFAULT x'';
    ALTER TABLE videos ADD COLUMN device INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE videos ADD COLUMN inode INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE videos ADD COLUMN missing_ns INTEGER;
    UPDATE videos SET dir = scanjobs_parent(path);
    CREATE INDEX videos_by_dir ON videos (dir);
    CREATE INDEX videos_by_identity ON videos (device, inode);
    CREATE INDEX videos_missing ON videos (missing_ns) WHERE missing_ns IS NOT NULL;
    CREATE TABLE file_errors (
        path       BLOB PRIMARY KEY,
        dir        BLOB NOT NULL,
        size_bytes INTEGER NOT NULL,
        mtime_ns   INTEGER NOT NULL,
        message    TEXT NOT NULL,
        job_id     TEXT NOT NULL,
        time_ns    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX file_errors_by_dir ON file_errors (dir);
    CREATE TABLE catalog_dirs (
        path   BLOB PRIMARY KEY,
        parent BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX catalog_dirs_by_parent ON catalog_dirs (parent);
    WITH RECURSIVE up(path) AS (
        SELECT DISTINCT dir FROM videos
        UNION SELECT scanjobs_parent(path) FROM up WHERE path <> x'2f'
    )
    INSERT INTO catalog_dirs SELECT path, scanjobs_parent(path) FROM up WHERE path <> x'2f';
    CREATE TABLE job_counts (
        job_id    TEXT PRIMARY KEY,
        added     INTEGER NOT NULL,
        updated   INTEGER NOT NULL,
        unchanged INTEGER NOT NULL,
        moved     INTEGER NOT NULL,
        restored  INTEGER NOT NULL,
        failed    INTEGER NOT NULL,
        removed   INTEGER NOT NULL,
        time_ns   INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    CHANGES_SCHEMA,
    # 6: each catalogued directory's summary (server.catalog.Summary).
    SUMMARY_SCHEMA,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class Database:
    """One SQLite file, one connection, one thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor | None,
        lock: BinaryIO | None,
        path: Path,
    ) -> None:
        self._conn = conn
        self._executor = executor
        self._lock = lock
        self._closed = False
        self._path = path
        self._fs_path = os.fspath(path)
        self._identity = _identity(path)

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating and migrating as needed) the database at ``path``.

        Raises:
            DatabaseInUse: another process has it open.
            DatabaseCorrupt: the file is not a usable database of ours.
        """
        try:
            lock = _lock(path.with_name(path.name + ".lock"))
        except OSError as exc:
            raise StorageIOError(f"cannot write in the data directory {path.parent}: "
                                 f"{exc.strerror}") from None  # fmt: skip
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            lock.close()
            raise
        return cls(conn, executor, lock, path)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @classmethod
    async def attach(cls, path: Path) -> Database:
        """Open the database a server at ``path`` already opened (and migrated and locked):
        a second connection, for a scan worker of that server. Its statements run on the
        calling thread: a worker's event loop has nothing else to do meanwhile, and the hop
        to a thread cost more than a directory's read."""
        return cls(_attach(path), None, None, path)

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn``, one transaction that may run again, as :meth:`run` does; while another
        process holds the write lock, try again every half millisecond (every 5 ms once it
        was held for 50 ms).

        SQLite's own wait sleeps 1, 2, 5, 10, 15 ms... between its tries: a scan worker's
        commit that ends (or a worker killed mid-commit that dies) 3 ms into the wait is
        seen 8 ms in, one that ends at 9 ms is seen at 18 ms. A job's state changes go out
        after their write (a cancel's terminal event among them), so they take the lock as
        soon as it is free.
        """
        return await self.run(partial(_promptly, fn))

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` on the database thread.

        Raises:
            StorageFull: the data directory's file system is out of space.
            StorageIOError: the database cannot be read or written (read-only, failing, or
                removed from under the server).
        """
        if self._executor is None:
            return self._call(fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn`` on the database thread, with SQLite's I/O faults as domain errors."""
        if _identity(self._fs_path) != self._identity:  # a str: on every call, cheapest
            # SQLite would go on writing to the unlinked file, and lose it all at the next start.
            raise StorageIOError(
                f"the database file {self._path} was removed or replaced while the server "
                "ran: nothing more can be kept; restore it or restart the server"
            )
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            fault = storage_fault(exc, self._path)
            if fault is None:
                raise
            raise fault from exc

    async def close(self) -> None:
        """Close the connection and its thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is None:
            self._conn.close()
        else:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._executor.shutdown(wait=True)
        if self._lock is not None:
            self._lock.close()  # releases the lock


_IO_FAULTS = frozenset(
    {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}
)


def storage_fault(exc: sqlite3.Error, path: Path) -> StorageFault | None:
    """The domain error for an SQLite error caused by the data directory; None for others
    (a bug in a statement stays a bug)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_FULL:
        return StorageFull(f"the data directory {path.parent} is out of space")
    if code in _IO_FAULTS:
        return StorageIOError(f"the database in {path.parent} cannot be used: {exc}")
    return None


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _lock(path: Path) -> BinaryIO:
    """Hold an exclusive lock on ``path`` for as long as the returned file stays open."""
    handle = path.open("a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        raise DatabaseInUse(f"{path.parent} is in use by {owner}") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}".encode())
    handle.flush()
    return handle


def _promptly(fn: Callable[[sqlite3.Connection], _T], conn: sqlite3.Connection) -> _T:
    """``fn(conn)``, tried again while the database is locked, every ``_BUSY_STEP_S`` at first,
    for up to the connection's usual busy timeout (see :meth:`Database.write`)."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        started = time.monotonic()
        while True:
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                waited = time.monotonic() - started
                if not busy or waited >= _BUSY_TIMEOUT_MS / 1000:
                    raise
            time.sleep(_BUSY_STEP_S if waited < _BUSY_LONG_AFTER_S else _BUSY_LONG_STEP_S)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")


def _connect(path: Path) -> sqlite3.Connection:
    # Created private: the catalog names every file. SQLite gives the -wal and -shm files the
    # database file's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {_SERVER_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
            raise sqlite3.DatabaseError("integrity check failed")
        _migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DatabaseCorrupt(f"{path}: {exc}") from exc
    conn.isolation_level = "DEFERRED"  # implicit transactions again, for `with conn:` blocks
    return conn


def _attach(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.create_function("scanjobs_parent", 1, parent_dir, deterministic=True)
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    conn.create_function("scanjobs_parent", 1, parent_dir, deterministic=True)
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this server knows ({SCHEMA_VERSION})"
        )
    for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")


# -- the catalog -----------------------------------------------------------------------------

_LOOKUP_CHUNK = 500


class SqliteCatalog(SqliteChanges):
    """The :class:`server.catalog.Catalog` in the ``videos``, ``file_errors``,
    ``catalog_dirs``, ``job_counts`` and ``video_changes`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._feed = ChangeFeed()

    async def read_directory(
        self, directory: bytes, digest: bytes = b"", fresh_after_ns: int = 0
    ) -> DirectoryRows:
        def query(conn: sqlite3.Connection) -> DirectoryRows:
            if digest:  # most directories of a rescan: one statement
                found = conn.execute(SETTLED_READ, (directory,) * 3).fetchall()
                rows = settled_rows(found, digest, fresh_after_ns)
                if rows is not None:
                    return rows
            state_sql, videos_sql, failures_sql, subdirs_sql = DIRECTORY_READS
            conn.execute("BEGIN")  # one snapshot (and one look at the WAL) for the four reads
            try:
                state = conn.execute(state_sql, (directory,)).fetchone()
                is_settled = settled(state, digest, fresh_after_ns)
                videos = [] if is_settled else conn.execute(videos_sql, (directory,)).fetchall()
                failures = conn.execute(failures_sql, (directory,)).fetchall()
                subdirs = conn.execute(subdirs_sql, (directory,)).fetchall()
            finally:
                conn.execute("COMMIT")
            return directory_rows(state, is_settled, videos, failures, subdirs)

        return await self._db.run(query)

    async def find_identities(self, identities: Sequence[tuple[int, int]]) -> list[Known]:
        def query(conn: sqlite3.Connection) -> list[Known]:
            # One indexed join per part, not one statement per file: a first scan of a
            # folder asks this for every file in it.
            found: list[Known] = []
            for start in range(0, len(identities), _IDENTITIES_PER_QUERY):
                part = identities[start : start + _IDENTITIES_PER_QUERY]
                values = ",".join(["(?,?)"] * len(part))
                sql = (
                    f"SELECT {_KNOWN_IN_V} FROM (VALUES {values}) AS w"  # noqa: S608 - constant
                    " JOIN videos AS v ON v.device = w.column1 AND v.inode = w.column2"
                )
                found.extend(Known._make(r) for r in conn.execute(sql, [*chain(*part)]))
            return found

        return await self._db.run(query) if identities else []

    async def live_below(self, directory: bytes, device: int) -> tuple[int, int]:
        def query(conn: sqlite3.Connection) -> tuple[int, int]:
            total, on_device = conn.execute(
                "SELECT count(*), coalesce(sum(device = ?), 0) FROM videos"
                " WHERE path >= ? AND path < ? AND missing_ns IS NULL",
                (device, *below(directory)),
            ).fetchone()
            return total, on_device

        return await self._db.run(query)

    async def commit(self, changes: DirectoryChanges) -> ScanCounts:
        steps = commit_steps(changes)

        def write(conn: sqlite3.Connection) -> ScanCounts:
            counters: dict[str, int] = {}
            with conn:
                for step in steps:
                    touched = conn.executemany(step.sql, step.rows).rowcount
                    if step.counter:
                        counters[step.counter] = counters.get(step.counter, 0) + touched
                counts, row = counts_row(changes, counters)
                conn.execute(COUNTS_UPSERT, row)
            if counters.get("logged"):
                loop.call_soon_threadsafe(self._feed.wake)
            return counts

        loop = asyncio.get_running_loop()
        return await self._db.run(write)

    async def job_counts(self, job_id: str) -> ScanCounts:
        def query(conn: sqlite3.Connection) -> ScanCounts:
            row = conn.execute(
                "SELECT added, updated, unchanged, moved, restored, failed, removed"
                " FROM job_counts WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            return ScanCounts(*row) if row else ScanCounts()

        return await self._db.run(query)

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

    async def list_failures(
        self, *, path_prefix: bytes, page_size: int, page_token: str, roots: Sequence[bytes] = ()
    ) -> FailurePage:
        after = decode_page_token(page_token) if page_token else b""
        sql, args = listing(
            "file_errors", FAILURE_COLUMNS, after=after, path_prefix=path_prefix, roots=roots
        )
        args.append(page_size + 1)

        def query(conn: sqlite3.Connection) -> list[Failure]:
            return [row_failure(r) for r in conn.execute(sql, args)]

        failures = await self._db.run(query)
        page = failures[:page_size]
        return page, encode_page_token(page[-1].path) if len(failures) > page_size else ""

    async def purge_missing(self, before_ns: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with conn:
                count = conn.execute(
                    "DELETE FROM videos WHERE missing_ns < ?", (before_ns,)
                ).rowcount
                if count:  # every job starts here: the prune reads every directory's row
                    conn.execute(_PRUNE_DIRS)
                conn.execute("DELETE FROM job_counts WHERE time_ns < ?", (before_ns,))
            return count

        return await self._db.run(write)

    async def purge_outside(self, roots: Sequence[bytes]) -> int:
        keep = " OR ".join("(path >= ? AND path < ?)" for _ in roots) or "1"
        args = [bound for root in roots for bound in below(root)]

        def write(conn: sqlite3.Connection) -> int:
            count = 0
            now = time.time_ns()
            with conn:
                conn.execute(removal_log(keep), [now, now, *args])
                for table in ("videos", "file_errors"):
                    sql = f"DELETE FROM {table} WHERE NOT ({keep})"  # noqa: S608 - names are ours
                    count += conn.execute(sql, args).rowcount
                conn.execute(_PRUNE_DIRS)
                conn.execute(UNSETTLE_ALL)
            return count

        count = await self._db.run(write)
        self._feed.wake()
        return count

    async def close(self) -> None:
        """Nothing of its own to close: the :class:`Database` is closed by its owner."""


# Directories with nothing catalogued below them any more (after a purge of tombstones).
_PRUNE_DIRS = """
DELETE FROM catalog_dirs WHERE NOT EXISTS (
    SELECT 1 FROM videos WHERE videos.path > CAST(catalog_dirs.path || x'2f' AS BLOB)
    AND videos.path < CAST(catalog_dirs.path || x'30' AS BLOB))
AND NOT EXISTS (
    SELECT 1 FROM file_errors WHERE file_errors.path > CAST(catalog_dirs.path || x'2f' AS BLOB)
    AND file_errors.path < CAST(catalog_dirs.path || x'30' AS BLOB))
"""
