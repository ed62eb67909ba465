"""The catalog's SQL, shared by SQLite (``server.store``) and PostgreSQL (``server.pgstore``).

Statements are written with ``?`` placeholders; :func:`pg` gives PostgreSQL's. A directory's
commit is a list of :class:`Step` s that both backends run in one transaction, adding up the
rows each counted step touched: the counts a job reports are those its statements applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any, NamedTuple

from .catalog import (
    DirectoryChanges,
    DirectoryRows,
    Failure,
    FileStamp,
    Known,
    ScanCounts,
    Video,
    ancestors,
    below,
    new_generation,
    parent_dir,
)
from .changes import ChangeKind, VideoChange
from .probe import MediaInfo

__all__ = [
    "CHANGE_COLUMNS",
    "COUNTS_UPSERT",
    "DIRECTORY_READS",
    "FAILURE_COLUMNS",
    "KNOWN_COLUMNS",
    "SETTLED_READ",
    "SUMMARY_SCHEMA",
    "UNSETTLE_ALL",
    "VIDEO_UPSERT",
    "Step",
    "changes_query",
    "commit_steps",
    "counts_row",
    "directory_rows",
    "listing",
    "logs_changes",
    "pg",
    "removal_log",
    "row_change",
    "row_failure",
    "row_known",
    "row_video",
    "settled",
    "video_row",
]

VIDEO_UPSERT = """
INSERT INTO videos VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (path) DO UPDATE SET
    size_bytes = excluded.size_bytes, mtime_ns = excluded.mtime_ns,
    container = excluded.container, duration_s = excluded.duration_s,
    bit_rate = excluded.bit_rate, video_codec = excluded.video_codec,
    width = excluded.width, height = excluded.height,
    frame_rate_num = excluded.frame_rate_num, frame_rate_den = excluded.frame_rate_den,
    audio_codec = excluded.audio_codec, audio_streams = excluded.audio_streams,
    subtitle_streams = excluded.subtitle_streams, data_streams = excluded.data_streams,
    last_seen_ns = excluded.last_seen_ns, job_id = excluded.job_id,
    device = excluded.device, inode = excluded.inode, missing_ns = NULL
"""
KNOWN_COLUMNS = "path, size_bytes, mtime_ns, last_seen_ns, device, inode, missing_ns"
FAILURE_COLUMNS = "path, size_bytes, mtime_ns, message, job_id, time_ns"
COUNTS_UPSERT = """
INSERT INTO job_counts VALUES (?,?,?,?,?,?,?,?,?)
ON CONFLICT (job_id) DO UPDATE SET
    added = job_counts.added + excluded.added,
    updated = job_counts.updated + excluded.updated,
    unchanged = job_counts.unchanged + excluded.unchanged,
    moved = job_counts.moved + excluded.moved,
    restored = job_counts.restored + excluded.restored,
    failed = job_counts.failed + excluded.failed,
    removed = job_counts.removed + excluded.removed,
    time_ns = excluded.time_ns
"""
# A directory's summary (``server.catalog.Summary``); both backends take these types (BYTEA
# has SQLite's numeric affinity, which keeps a blob as it is).
SUMMARY_SCHEMA = """
ALTER TABLE catalog_dirs ADD COLUMN digest BYTEA;
ALTER TABLE catalog_dirs ADD COLUMN seen_ns BIGINT;
ALTER TABLE catalog_dirs ADD COLUMN gen BIGINT NOT NULL DEFAULT 0;
"""
UNSETTLE_ALL = "UPDATE catalog_dirs SET digest = NULL, seen_ns = NULL, gen = gen + 1"
# A directory read: its summary first (a write after it moves the generation on), then its
# videos (unless settled), failures and catalogued sub-directories.
DIRECTORY_READS = (
    "SELECT gen, digest, seen_ns FROM catalog_dirs WHERE path = ?",
    f"SELECT {KNOWN_COLUMNS} FROM videos WHERE dir = ?",  # noqa: S608 - constant
    f"SELECT {FAILURE_COLUMNS} FROM file_errors WHERE dir = ?",  # noqa: S608 - constant
    "SELECT path FROM catalog_dirs WHERE parent = ?",
)
# A directory read in one statement when it may be settled (one snapshot, one round trip):
# its summary (tagged 0), failures (1) and catalogued sub-directories (2), not its videos.
# NULLs are typed for PostgreSQL's UNION; the directory is given once per part.
_NONE = {t: f"CAST(NULL AS {t})" for t in ("BIGINT", "BYTEA", "TEXT")}
_NO_SUMMARY = ", ".join(_NONE[t] for t in ("BIGINT", "BYTEA", "BIGINT"))
_NO_FAILURE = ", ".join(_NONE[t] for t in ("BIGINT", "BIGINT", "TEXT", "TEXT", "BIGINT"))
_NO_ROW = f"{_NONE['BYTEA']}, {_NO_FAILURE}"
SETTLED_READ = " UNION ALL ".join(
    (
        f"SELECT 0, gen, digest, seen_ns, {_NO_ROW} FROM catalog_dirs WHERE path = ?",  # noqa: S608 - constant
        f"SELECT 1, {_NO_SUMMARY}, {FAILURE_COLUMNS} FROM file_errors WHERE dir = ?",  # noqa: S608 - constant
        f"SELECT 2, {_NO_SUMMARY}, path, {_NO_FAILURE} FROM catalog_dirs WHERE parent = ?",  # noqa: S608 - constant
    )
)
# Each directory's summary is stored if its generation is the one expected, else cleared;
# either way the generation moves on. Run for every commit's directory and the directories
# it unsettles (expecting no generation: -1), in path order.
_SETTLE = (
    "UPDATE catalog_dirs SET digest = CASE WHEN gen = ? THEN ? END,"
    " seen_ns = CASE WHEN gen = ? THEN ? END, gen = gen + 1 WHERE path = ?"
)
_FAILURE_UPSERT = """
INSERT INTO file_errors VALUES (?,?,?,?,?,?,?)
ON CONFLICT (path) DO UPDATE SET
    size_bytes = excluded.size_bytes, mtime_ns = excluded.mtime_ns,
    message = excluded.message, job_id = excluded.job_id, time_ns = excluded.time_ns
"""


VIDEO_COLUMNS = (
    "path", "size_bytes", "mtime_ns", "container", "duration_s", "bit_rate", "video_codec",
    "width", "height", "frame_rate_num", "frame_rate_den", "audio_codec", "audio_streams",
    "subtitle_streams", "data_streams", "first_seen_ns", "last_seen_ns", "job_id", "dir",
    "device", "inode", "missing_ns",
)  # fmt: skip
CHANGE_COLUMNS = "sequence, kind, previous_path, time_ns, " + ", ".join(VIDEO_COLUMNS)
_FIRST_SEEN = VIDEO_COLUMNS.index("first_seen_ns")
_LAST_SEEN = VIDEO_COLUMNS.index("last_seen_ns")
# A probed video's change, written before its upsert: ADDED unless a present video is there.
_PROBED_LOG = (
    f"INSERT INTO video_changes (kind, previous_path, time_ns, {', '.join(VIDEO_COLUMNS)})"  # noqa: S608 - constant
    " VALUES (CASE WHEN EXISTS (SELECT 1 FROM videos WHERE path = ? AND missing_ns IS NULL)"
    f" THEN {ChangeKind.UPDATED:d} ELSE {ChangeKind.ADDED:d} END, NULL, ?, "
    + ", ".join(["?"] * _FIRST_SEEN)
    + ", coalesce((SELECT first_seen_ns FROM videos WHERE path = ?), ?), "
    + ", ".join(["?"] * (len(VIDEO_COLUMNS) - _FIRST_SEEN - 1))
    + ")"
)


def _log_copy(
    kind: ChangeKind, where: str, overrides: dict[str, str], previous: str = "NULL"
) -> str:
    """A statement logging a change of the ``videos`` rows matching ``where``, as they are
    after the change: columns in ``overrides`` take the given expression (``?`` parameters
    come first the time, then the overrides in column order, then those of ``where``)."""
    columns = ", ".join(overrides.get(c, c) for c in VIDEO_COLUMNS)
    return (
        f"INSERT INTO video_changes (kind, previous_path, time_ns, {', '.join(VIDEO_COLUMNS)})"  # noqa: S608 - constant parts
        f" SELECT {kind:d}, {previous}, ?, {columns} FROM videos WHERE {where} ORDER BY path"
    )


_MOVED_LOG = _log_copy(
    ChangeKind.MOVED,
    "path = ?",
    {"path": "?", "last_seen_ns": "?", "dir": "?", "device": "?", "inode": "?",
     "missing_ns": "NULL"},
    previous="path",
)  # fmt: skip
_RESTORED_LOG = _log_copy(
    ChangeKind.RESTORED,
    "path = ? AND missing_ns IS NOT NULL",
    {"last_seen_ns": "?", "device": "?", "inode": "?", "missing_ns": "NULL"},
)
_REMOVED_LOG = _log_copy(ChangeKind.REMOVED, "path = ? AND missing_ns IS NULL", {"missing_ns": "?"})
_REMOVED_BELOW_LOG = _log_copy(
    ChangeKind.REMOVED, "path >= ? AND path < ? AND missing_ns IS NULL", {"missing_ns": "?"}
)


def removal_log(keep: str) -> str:
    """A statement logging the removal of the present videos not matching ``keep``
    (parameters: the time twice, then those of ``keep``)."""
    return _log_copy(
        ChangeKind.REMOVED, f"NOT ({keep}) AND missing_ns IS NULL", {"missing_ns": "?"}
    )


def pg(sql: str) -> str:
    """A statement with PostgreSQL's placeholders."""
    return sql.replace("?", "%s")


class Step(NamedTuple):
    """One statement run for each of ``rows``; ``counter`` (if any) adds up the rows touched."""

    sql: str
    rows: list[tuple[object, ...]]
    counter: str | None = None


def commit_steps(c: DirectoryChanges) -> list[Step]:
    """The statements of one directory's commit, in order; empty ones left out."""
    now = c.now_ns
    probed = [video_row(v, c.job_id, now) for v in c.probed]
    steps = [
        Step(
            _MOVED_LOG,
            [
                (now, m.new_path, now, parent_dir(m.new_path), m.device, m.inode, m.old_path)
                for m in c.moved
            ],
            "logged",
        ),
        *_move_steps(c),
        Step(_PROBED_LOG, [_probed_log_row(row) for row in probed], "logged"),
        Step(VIDEO_UPSERT, probed),
        Step("DELETE FROM file_errors WHERE path = ?", [(v.path,) for v in c.probed]),
        Step(
            "UPDATE videos SET last_seen_ns = ?, device = ?, inode = ?"
            " WHERE path = ? AND missing_ns IS NULL",
            [(now, dev, ino, path) for path, dev, ino in c.seen],
        ),
        Step(
            _RESTORED_LOG,
            [(now, now, dev, ino, path) for path, dev, ino in c.restored],
            "logged",
        ),
        Step(
            "UPDATE videos SET missing_ns = NULL, last_seen_ns = ?, device = ?, inode = ?"
            " WHERE path = ? AND missing_ns IS NOT NULL",
            [(now, dev, ino, path) for path, dev, ino in c.restored],
            "restored",
        ),
        Step(_FAILURE_UPSERT, [_failure_row(f, c.job_id, now) for f in c.failures]),
        Step(_REMOVED_LOG, [(now, now, path) for path in c.missing], "logged"),
        Step(
            "UPDATE videos SET missing_ns = ? WHERE path = ? AND missing_ns IS NULL",
            [(now, path) for path in c.missing],
            "removed",
        ),
        Step("DELETE FROM file_errors WHERE path = ?", [(path,) for path in c.missing]),
        Step(_REMOVED_BELOW_LOG, [(now, now, *below(d)) for d in c.gone_dirs], "logged"),
        Step(
            "UPDATE videos SET missing_ns = ? WHERE path >= ? AND path < ? AND missing_ns IS NULL",
            [(now, *below(d)) for d in c.gone_dirs],
            "removed",
        ),
        Step(
            "DELETE FROM file_errors WHERE path >= ? AND path < ?", [below(d) for d in c.gone_dirs]
        ),
    ]
    fresh = new_generation() if c.writes_rows() else -1
    if c.writes_rows():
        steps.append(
            Step(
                "INSERT INTO catalog_dirs (path, parent, gen) VALUES (?, ?, ?)"
                " ON CONFLICT (path) DO NOTHING",
                [(d, parent, fresh) for d, parent in ancestors(c.directory)],
            )
        )
    steps += _settle_steps(c, fresh)
    return [s for s in steps if s.rows]


def _settle_steps(c: DirectoryChanges, fresh: int) -> list[Step]:
    """Forget ``c``'s ``gone_dirs`` (and the directories below them), clear the summaries
    of the directories it unsettles, and store its own if its directory was not written
    since it was read (``fresh``: the generation of directories ``c`` catalogues)."""
    s = c.summary
    # Typed parameters even where they are not stored (PostgreSQL infers the CASE's type).
    mine: tuple[object, ...] = (-1, b"", -1, 0, c.directory)
    if s is not None:
        expected = fresh if s.gen is None else s.gen
        mine = (expected, s.digest, expected, s.seen_ns, c.directory)
    rows: dict[bytes, tuple[object, ...]] = {d: (-1, b"", -1, 0, d) for d in c.unsettled()}
    rows[c.directory] = mine
    return [
        # A gone directory is no longer catalogued (its tombstones stay, under its name): its
        # parent lists as settled again, and should it come back it is read afresh.
        Step(
            "DELETE FROM catalog_dirs WHERE path >= ? AND path < ?", [below(d) for d in c.gone_dirs]
        ),
        Step("DELETE FROM catalog_dirs WHERE path = ?", [(d,) for d in c.gone_dirs]),
        Step(_SETTLE, [rows[d] for d in sorted(rows)]),
    ]


def settled(state: Sequence[Any] | None, digest: bytes, fresh_after_ns: int) -> bool:
    """True if a directory's summary row (``DIRECTORY_READS[0]``) has ``digest``, fresh."""
    if state is None or not digest or state[1] is None:
        return False
    return bytes(state[1]) == digest and state[2] >= fresh_after_ns


def settled_rows(
    rows: Sequence[Sequence[Any]], digest: bytes, fresh_after_ns: int
) -> DirectoryRows | None:
    """The :class:`DirectoryRows` of a settled directory from the rows of ``SETTLED_READ``;
    None if it is not settled."""
    state = next((r[1:4] for r in rows if r[0] == 0), None)
    if not settled(state, digest, fresh_after_ns):
        return None
    failures = [r[4:] for r in rows if r[0] == 1]
    return directory_rows(state, True, (), failures, [r[4:5] for r in rows if r[0] == 2])


def directory_rows(
    state: Sequence[Any] | None,
    is_settled: bool,
    videos: Sequence[Sequence[Any]],
    failures: Sequence[Sequence[Any]],
    subdirs: Sequence[Sequence[Any]],
) -> DirectoryRows:
    """A :class:`DirectoryRows` from the rows of ``DIRECTORY_READS``."""
    return DirectoryRows(
        {bytes(r[0]): row_known(r) for r in videos},
        {bytes(r[0]): row_failure(r) for r in failures},
        frozenset(bytes(r[0]) for r in subdirs),
        None if state is None else state[0],
        is_settled,
    )


def _probed_log_row(row: tuple[object, ...]) -> tuple[object, ...]:
    """The parameters of ``_PROBED_LOG`` for a video's :func:`video_row`."""
    path, now_ns = row[0], row[_LAST_SEEN]
    return (path, now_ns, *row[:_FIRST_SEEN], path, *row[_FIRST_SEEN:])


def logs_changes(steps: Sequence[Step]) -> bool:
    """True when a commit of ``steps`` may log changes."""
    return any(s.counter == "logged" for s in steps)


def _move_steps(c: DirectoryChanges) -> list[Step]:
    moves = c.moved
    return [
        # No-op updates: the first locks each moved row (in PostgreSQL a concurrent commit of
        # another directory may be marking it missing right now), the second then counts the
        # rows this job had marked missing: those files were not removed after all.
        Step(
            "UPDATE videos SET missing_ns = missing_ns WHERE path = ?",
            [(m.old_path,) for m in moves],
        ),
        Step(
            "UPDATE videos SET missing_ns = missing_ns WHERE path = ? AND missing_ns >= ?",
            [(m.old_path, c.since_ns) for m in moves],
            "unremoved",
        ),
        Step(
            "DELETE FROM videos WHERE path = ? AND EXISTS (SELECT 1 FROM videos WHERE path = ?)",
            [(m.new_path, m.old_path) for m in moves],
        ),
        Step(
            "UPDATE videos SET path = ?, dir = ?, device = ?, inode = ?, missing_ns = NULL,"
            " last_seen_ns = ? WHERE path = ?",
            [
                (m.new_path, parent_dir(m.new_path), m.device, m.inode, c.now_ns, m.old_path)
                for m in moves
            ],
            "moved",
        ),
        Step("DELETE FROM file_errors WHERE path = ?", [(m.new_path,) for m in moves]),
    ]


def counts_row(
    c: DirectoryChanges, counters: dict[str, int]
) -> tuple[ScanCounts, tuple[object, ...]]:
    """The counts a commit applied, and the ``job_counts`` row that adds them to the job's."""
    counts = replace(
        c.counts,
        moved=counters.get("moved", 0),
        restored=counters.get("restored", 0),
        removed=counters.get("removed", 0) - counters.get("unremoved", 0),
    )
    return counts, (c.job_id, *counts.as_tuple(), c.now_ns)


def listing(
    table: str,
    columns: str,
    *,
    after: bytes,
    path_prefix: bytes,
    roots: Sequence[bytes],
    extra: str = "",
) -> tuple[str, list[object]]:
    """A paged listing of ``table`` by path: after a token, under a prefix and the roots."""
    sql = (
        f"SELECT {columns} FROM {table} WHERE path > ? AND path >= ?"  # noqa: S608 - names are ours
        " AND substr(path, 1, ?) = ?"
    )
    args: list[object] = [after, path_prefix, len(path_prefix), path_prefix]
    if roots:
        sql += " AND (" + " OR ".join("(path >= ? AND path < ?)" for _ in roots) + ")"
        for root in roots:
            args.extend(below(root))
    return sql + extra + " ORDER BY path LIMIT ?", args


def video_row(video: Video, job_id: str, now_ns: int) -> tuple[object, ...]:
    """The ``videos`` columns of a video, in table order."""
    info = video.info
    rate = info.frame_rate
    return (
        video.path, video.stamp.size_bytes, video.stamp.mtime_ns, info.container,
        info.duration_s, info.bit_rate, info.video_codec, info.width, info.height,
        rate.numerator if rate else None, rate.denominator if rate else None,
        info.audio_codec, info.audio_streams, info.subtitle_streams, info.data_streams,
        now_ns, now_ns, job_id, parent_dir(video.path), video.device, video.inode, None,
    )  # fmt: skip


def row_video(row: Sequence[Any]) -> Video:
    """Inverse of :func:`video_row`."""
    (path, size, mtime, container, duration, bit_rate, vcodec, width, height, num, den,
     acodec, audio_n, subs_n, data_n, first, last, job_id, _dir, device, inode,
     missing) = row  # fmt: skip
    info = MediaInfo(
        container=container,
        duration_s=duration,
        bit_rate=bit_rate,
        video_codec=vcodec,
        width=width,
        height=height,
        frame_rate=Fraction(num, den) if num is not None and den else None,
        audio_codec=acodec,
        audio_streams=audio_n,
        subtitle_streams=subs_n,
        data_streams=data_n,
    )
    return Video(
        bytes(path), FileStamp(size, mtime), info, first, last, job_id, device, inode, missing
    )


def row_change(row: Sequence[Any]) -> VideoChange:
    """A change from its :data:`CHANGE_COLUMNS`."""
    sequence, kind, previous, nanos, *video = row
    previous_path = bytes(previous) if previous is not None else None
    return VideoChange(sequence, ChangeKind(kind), row_video(video), previous_path, nanos)


def changes_query(path_prefix: bytes) -> tuple[str, list[object]]:
    """The changes after a sequence (the first parameter to add) under ``path_prefix``,
    in order; the limit is the last parameter to add."""
    sql = f"SELECT {CHANGE_COLUMNS} FROM video_changes WHERE sequence > ?"  # noqa: S608 - constant
    args: list[object] = []
    if path_prefix:
        sql += " AND (substr(path, 1, ?) = ? OR substr(previous_path, 1, ?) = ?)"
        args = [len(path_prefix), path_prefix, len(path_prefix), path_prefix]
    return sql + " ORDER BY sequence LIMIT ?", args


def row_known(row: Sequence[Any]) -> Known:
    """A :class:`Known` from the :data:`KNOWN_COLUMNS` of a row."""
    path, size, mtime, last_seen, device, inode, missing = row
    return Known(bytes(path), size, mtime, last_seen, device, inode, missing)


def _failure_row(f: Failure, job_id: str, now_ns: int) -> tuple[object, ...]:
    return (f.path, parent_dir(f.path), f.stamp.size_bytes, f.stamp.mtime_ns, f.message,
            job_id, now_ns)  # fmt: skip


def row_failure(row: Sequence[Any]) -> Failure:
    """A :class:`Failure` from the :data:`FAILURE_COLUMNS` of a row."""
    path, size, mtime, message, job_id, time_ns = row
    return Failure(bytes(path), FileStamp(size, mtime), message, job_id, time_ns)
