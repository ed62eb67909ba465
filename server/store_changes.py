"""SQLite's change log (see ``server.changes``): the table, and the reads of
``server.store.SqliteCatalog`` that concern it.

Every statement runs on the database's one thread, so a listing and the sequence it reports
are read together, and the sequence (``AUTOINCREMENT``, never reused) follows commit order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .catalog import Listing, Video, decode_page_token, encode_page_token
from .catalog_sql import changes_query, listing, row_change, row_video
from .changes import ChangeFeed, VideoChange, check_history

if TYPE_CHECKING:
    from .store import Database

__all__ = ["CHANGES_SCHEMA", "SqliteChanges"]

# Migration 5: the change log, and the highest sequence pruned from it.
CHANGES_SCHEMA = """
CREATE TABLE video_changes (
    sequence         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             INTEGER NOT NULL,
    previous_path    BLOB,
    time_ns          INTEGER NOT NULL,
    path             BLOB NOT NULL,
    size_bytes       INTEGER, mtime_ns INTEGER, container TEXT, duration_s REAL,
    bit_rate         INTEGER, video_codec TEXT, width INTEGER, height INTEGER,
    frame_rate_num   INTEGER, frame_rate_den INTEGER, audio_codec TEXT,
    audio_streams    INTEGER, subtitle_streams INTEGER, data_streams INTEGER,
    first_seen_ns    INTEGER, last_seen_ns INTEGER, job_id TEXT, dir BLOB,
    device           INTEGER, inode INTEGER, missing_ns INTEGER
);
CREATE INDEX video_changes_by_time ON video_changes (time_ns);
CREATE TABLE catalog_history (pruned_through INTEGER NOT NULL);
INSERT INTO catalog_history VALUES (0);
"""
_HISTORY = (
    "SELECT pruned_through,"
    " max(coalesce((SELECT max(sequence) FROM video_changes), 0), pruned_through)"
    " FROM catalog_history"
)


def high_water(conn: sqlite3.Connection) -> int:
    """The sequence of the newest change ever committed (pruned or not)."""
    return int(conn.execute(_HISTORY).fetchone()[1])


class SqliteChanges:
    """The change-log half of ``SqliteCatalog``."""

    _db: Database
    _feed: ChangeFeed

    @property
    def feed(self) -> ChangeFeed:
        return self._feed

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
        extra = " AND (? = '' OR job_id = ?)"
        if not include_missing:
            extra += " AND missing_ns IS NULL"
        sql, args = listing(
            "videos", "*", after=after, path_prefix=path_prefix, roots=roots, extra=extra
        )
        args += [job_id, job_id, page_size + 1]

        def query(conn: sqlite3.Connection) -> tuple[list[Video], int]:
            return [row_video(r) for r in conn.execute(sql, args)], high_water(conn)

        videos, sequence = await self._db.run(query)
        page = videos[:page_size]
        token = encode_page_token(page[-1].path) if len(videos) > page_size else ""
        return page, token, sequence

    async def changes_after(self, after: int, path_prefix: bytes, limit: int) -> list[VideoChange]:
        sql, args = changes_query(path_prefix)

        def query(conn: sqlite3.Connection) -> list[VideoChange]:
            pruned, high = conn.execute(_HISTORY).fetchone()
            check_history(after, pruned_through=pruned, high_water=high)
            return [row_change(r) for r in conn.execute(sql, [after, *args, limit])]

        return await self._db.run(query)

    async def prune_changes(self, before_ns: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with conn:
                # By the time index: left to itself, SQLite reads the sequence backwards from
                # the newest change, which is every change while none is old enough (a scan
                # of the table at every job's start).
                (cut,) = conn.execute(
                    "SELECT max(sequence) FROM video_changes INDEXED BY video_changes_by_time "
                    "WHERE time_ns < ?",
                    (before_ns,),
                ).fetchone()
                if cut is None:
                    return 0
                count = conn.execute(
                    "DELETE FROM video_changes WHERE sequence <= ?", (cut,)
                ).rowcount
                conn.execute(
                    "UPDATE catalog_history SET pruned_through = max(pruned_through, ?)", (cut,)
                )
            return count

        return await self._db.run(write)
