"""The video catalog: one row per video file, keyed by its absolute path (raw bytes).

Two implementations of one :class:`Catalog` seam: :class:`SqliteCatalog`, the embedded
default (one WAL-mode file, schema versioned with ``PRAGMA user_version``), and
:class:`InMemoryCatalog` for tests. Paths are stored as the exact bytes the file system
gave, so names that are not valid UTF-8 survive a round trip.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Protocol, TypeVar

from server.errors import InvalidArgument
from server.probe import MediaInfo

__all__ = [
    "Catalog",
    "CatalogCorrupt",
    "FileStamp",
    "InMemoryCatalog",
    "SqliteCatalog",
    "Video",
    "VideoPage",
]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What decides whether a file changed since it was catalogued."""

    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Video:
    """A catalogued video."""

    path: bytes
    stamp: FileStamp
    info: MediaInfo
    first_seen_ns: int
    last_seen_ns: int
    job_id: str


VideoPage = tuple[list[Video], str]


class CatalogCorrupt(RuntimeError):
    """The database file exists but cannot be used; the server must not start on it."""


class Catalog(Protocol):
    """Where scans keep what they found."""

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, FileStamp]: ...

    async def commit(
        self, job_id: str, probed: Sequence[Video], unchanged: Sequence[bytes], now_ns: int
    ) -> None: ...

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage: ...

    async def close(self) -> None: ...


def encode_page_token(path: bytes) -> str:
    """Opaque token that resumes a listing after ``path``."""
    return base64.urlsafe_b64encode(b"v1|" + path).decode().rstrip("=")


def decode_page_token(token: str) -> bytes:
    """Inverse of :func:`encode_page_token`.

    Raises:
        InvalidArgument: the token is not one this server made.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if not raw.startswith(b"v1|"):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return raw[3:]


class InMemoryCatalog:
    """A catalog in a dict: the test double of :class:`SqliteCatalog`."""

    def __init__(self) -> None:
        self._videos: dict[bytes, Video] = {}

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, FileStamp]:
        return {p: self._videos[p].stamp for p in paths if p in self._videos}

    async def commit(
        self, job_id: str, probed: Sequence[Video], unchanged: Sequence[bytes], now_ns: int
    ) -> None:
        for video in probed:
            old = self._videos.get(video.path)
            first = old.first_seen_ns if old else now_ns
            self._videos[video.path] = replace(
                video, first_seen_ns=first, last_seen_ns=now_ns, job_id=job_id
            )
        for path in unchanged:
            if path in self._videos:
                self._videos[path] = replace(self._videos[path], last_seen_ns=now_ns, job_id=job_id)

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage:
        after = decode_page_token(page_token) if page_token else None
        matching = [
            video
            for path, video in sorted(self._videos.items())
            if path.startswith(path_prefix)
            and (not job_id or video.job_id == job_id)
            and (after is None or path > after)
        ]
        page = matching[:page_size]
        more = len(matching) > page_size
        return page, encode_page_token(page[-1].path) if more else ""

    async def close(self) -> None:
        return None


_MIGRATIONS: tuple[str, ...] = (
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
)

_UPSERT = """
INSERT INTO videos VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
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
_LOOKUP_CHUNK = 500


class SqliteCatalog:
    """The catalog in one SQLite file, used from one dedicated thread.

    All statements run on a single-thread executor, so the event loop never blocks on the
    database and writes are serialised without locks of our own.
    """

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> SqliteCatalog:
        """Open (creating and migrating as needed) the catalog at ``path``.

        Raises:
            CatalogCorrupt: the file is not a usable SQLite database of ours.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor)

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, FileStamp]:
        def query(conn: sqlite3.Connection) -> dict[bytes, FileStamp]:
            found: dict[bytes, FileStamp] = {}
            for start in range(0, len(paths), _LOOKUP_CHUNK):
                chunk = paths[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT path, size_bytes, mtime_ns FROM videos WHERE path IN ({marks})"  # noqa: S608 - only placeholders are interpolated
                for path, size, mtime in conn.execute(sql, chunk):
                    found[path] = FileStamp(size, mtime)
            return found

        return await self._run(query)

    async def commit(
        self, job_id: str, probed: Sequence[Video], unchanged: Sequence[bytes], now_ns: int
    ) -> None:
        rows = [_row(v, job_id, now_ns) for v in probed]
        touched = [(now_ns, job_id, p) for p in unchanged]

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(_UPSERT, rows)
                conn.executemany(
                    "UPDATE videos SET last_seen_ns = ?, job_id = ? WHERE path = ?", touched
                )

        await self._run(write)

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage:
        after = decode_page_token(page_token) if page_token else b""

        def query(conn: sqlite3.Connection) -> list[Video]:
            sql = (
                "SELECT * FROM videos WHERE path > ? AND path >= ?"
                " AND substr(path, 1, ?) = ? AND (? = '' OR job_id = ?)"
                " ORDER BY path LIMIT ?"
            )
            args = (
                after,
                path_prefix,
                len(path_prefix),
                path_prefix,
                job_id,
                job_id,
                page_size + 1,
            )
            return [_video(r) for r in conn.execute(sql, args)]

        videos = await self._run(query)
        more = len(videos) > page_size
        page = videos[:page_size]
        return page, encode_page_token(page[-1].path) if more else ""

    async def close(self) -> None:
        """Close the connection and its thread; idempotent."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
            raise sqlite3.DatabaseError("integrity check failed")
        _migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise CatalogCorrupt(f"{path}: {exc}") from exc
    conn.isolation_level = "DEFERRED"  # implicit transactions again, for `with conn:` blocks
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(_MIGRATIONS):
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this server knows ({len(_MIGRATIONS)})"
        )
    for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")


def _row(video: Video, job_id: str, now_ns: int) -> tuple[object, ...]:
    info = video.info
    rate = info.frame_rate
    return (
        video.path, video.stamp.size_bytes, video.stamp.mtime_ns, info.container,
        info.duration_s, info.bit_rate, info.video_codec, info.width, info.height,
        rate.numerator if rate else None, rate.denominator if rate else None,
        info.audio_codec, info.audio_streams, info.subtitle_streams, info.data_streams,
        now_ns, now_ns, job_id,
    )  # fmt: skip


def _video(row: tuple[object, ...]) -> Video:
    (path, size, mtime, container, duration, bit_rate, vcodec, width, height, num, den,
     acodec, audio_n, subs_n, data_n, first, last, job_id) = row  # fmt: skip
    info = MediaInfo(
        container=str(container),
        duration_s=float(duration) if isinstance(duration, float | int) else None,
        bit_rate=int(bit_rate),  # type: ignore[call-overload]
        video_codec=str(vcodec),
        width=int(width),  # type: ignore[call-overload]
        height=int(height),  # type: ignore[call-overload]
        frame_rate=Fraction(num, den) if isinstance(num, int) and isinstance(den, int) else None,
        audio_codec=str(acodec),
        audio_streams=int(audio_n),  # type: ignore[call-overload]
        subtitle_streams=int(subs_n),  # type: ignore[call-overload]
        data_streams=int(data_n),  # type: ignore[call-overload]
    )
    return Video(
        path=bytes(path),  # type: ignore[call-overload]
        stamp=FileStamp(int(size), int(mtime)),  # type: ignore[call-overload]
        info=info,
        first_seen_ns=int(first),  # type: ignore[call-overload]
        last_seen_ns=int(last),  # type: ignore[call-overload]
        job_id=str(job_id),
    )
