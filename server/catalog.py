"""The video catalog seam: one record per video file, keyed by its absolute path (raw bytes).

Paths are the exact bytes the file system gave, so names that are not valid UTF-8 survive a
round trip. Scans work per directory: :meth:`Catalog.read_directory` reads the rows of one
directory in one indexed read, :meth:`Catalog.commit` writes that directory's changes
(probed files, moves, restores, tombstones, remembered failures) together with the counts
they make, in one transaction. :class:`InMemoryCatalog` is the test double of
``server.store.SqliteCatalog`` and ``server.pgstore.PgCatalog``; one contract suite runs
over all three.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Protocol, TypeVar

from .changes import ChangeFeed, ChangeKind, VideoChange, check_history
from .errors import InvalidArgument
from .probe import MediaInfo

__all__ = [
    "Catalog",
    "DirectoryChanges",
    "DirectoryRows",
    "Failure",
    "FailurePage",
    "FileStamp",
    "InMemoryCatalog",
    "Known",
    "Listing",
    "Move",
    "ScanCounts",
    "Sighting",
    "Video",
    "VideoPage",
    "ancestors",
    "below",
    "decode_page_token",
    "encode_page_token",
    "parent_dir",
    "under_roots",
]


class FileStamp(NamedTuple):
    """What decides whether a file changed since it was catalogued."""

    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Video:
    """A catalogued video.

    Attributes:
        job_id: the job that last probed it (added or updated).
        device, inode: the file's identity when last seen (0 when not known); a file found
            at a new path with the same identity and stamp is the same file, moved.
        missing_ns: when a scan found it gone (a tombstone), else None.
    """

    path: bytes
    stamp: FileStamp
    info: MediaInfo
    first_seen_ns: int
    last_seen_ns: int
    job_id: str
    device: int = 0
    inode: int = 0
    missing_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A file that could not be probed, remembered with the stamp it had then."""

    path: bytes
    stamp: FileStamp
    message: str
    job_id: str = ""
    time_ns: int = 0


class Known(NamedTuple):
    """What a directory read gives of a catalogued video: enough to compare, nothing more
    (a rescan reads many of these)."""

    path: bytes
    size_bytes: int
    mtime_ns: int
    last_seen_ns: int
    device: int
    inode: int
    missing_ns: int | None

    @property
    def stamp(self) -> FileStamp:
        """Size and mtime as catalogued."""
        return FileStamp(self.size_bytes, self.mtime_ns)

    @classmethod
    def of(cls, video: Video) -> Known:
        """The comparable part of a video."""
        s = video.stamp
        return cls(video.path, s.size_bytes, s.mtime_ns, video.last_seen_ns, video.device,
                   video.inode, video.missing_ns)  # fmt: skip


class Sighting(NamedTuple):
    """A catalogued file seen again at its path (unchanged or restored), with its identity."""

    path: bytes
    device: int
    inode: int


class Move(NamedTuple):
    """A catalogued video found at a new path."""

    old_path: bytes
    new_path: bytes
    device: int
    inode: int


@dataclass(frozen=True, slots=True)
class ScanCounts:
    """Counts of what a job did; see ``server.jobs.ScanResult``."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0
    restored: int = 0
    failed: int = 0
    removed: int = 0

    def __add__(self, other: ScanCounts) -> ScanCounts:
        return ScanCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: ScanCounts) -> ScanCounts:
        return ScanCounts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def as_tuple(self) -> tuple[int, ...]:
        """The counts in field order (the storage column order)."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, slots=True)
class DirectoryRows:
    """What the catalog holds for one directory.

    Attributes:
        videos: the videos directly in it, tombstones included, by path.
        failures: the remembered failures directly in it, by path.
        subdirs: catalogued directories directly below it (full paths).
    """

    videos: dict[bytes, Known] = field(default_factory=dict)
    failures: dict[bytes, Failure] = field(default_factory=dict)
    subdirs: frozenset[bytes] = frozenset()


@dataclass(slots=True)
class DirectoryChanges:
    """One directory's changes, committed in one transaction with the counts they make.

    Attributes:
        job_id: the job making them; probed videos record it.
        directory: the directory; every path below is directly in it, except moves' old
            paths and ``gone_dirs``.
        now_ns: the time they were seen.
        since_ns: the job's start: tombstones written since then are this job's, so that a
            file this job marked missing and then found moved is not counted as removed.
        probed: videos probed (added or updated); their tombstones and failures are cleared.
        seen: unchanged files; their last-seen time and identity are refreshed.
        restored: tombstones found back unchanged.
        moved: videos found at a new path.
        failures: files that could not be probed.
        missing: catalogued paths in the directory that are gone: videos become tombstones,
            failures are forgotten.
        gone_dirs: catalogued subdirectories that are gone: everything below them likewise.
        counts: added, updated, unchanged and failed as the scan counted them; the catalog
            adds moved, restored and removed as it applied them. They are committed with
            the rows they count; a directory with no row to write commits nothing.
    """

    job_id: str
    directory: bytes
    now_ns: int
    since_ns: int = 0
    probed: list[Video] = field(default_factory=list)
    seen: list[Sighting] = field(default_factory=list)
    restored: list[Sighting] = field(default_factory=list)
    moved: list[Move] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    gone_dirs: list[bytes] = field(default_factory=list)
    counts: ScanCounts = field(default_factory=ScanCounts)

    def writes_anything(self) -> bool:
        """True when a row changes; counts alone are not written (they count no row)."""
        return bool(
            self.probed or self.seen or self.restored or self.moved or self.failures
            or self.missing or self.gone_dirs
        )  # fmt: skip

    def writes_rows(self) -> bool:
        """True when the directory gains rows (so that it becomes a catalogued directory)."""
        return bool(self.probed or self.moved or self.failures)


VideoPage = tuple[list[Video], str]
Listing = tuple[list[Video], str, int]  # a page, its next page token, its catalog sequence
FailurePage = tuple[list[Failure], str]


class Catalog(Protocol):
    """Where scans keep what they found.

    Every commit also writes the changes it makes to the change log (``server.changes``),
    in the same transaction, and wakes :attr:`feed`.
    """

    @property
    def feed(self) -> ChangeFeed:
        """Woken when changes are committed."""
        ...

    async def read_directory(self, directory: bytes) -> DirectoryRows:
        """The rows of one directory, in one indexed read."""
        ...

    async def find_identities(self, identities: Sequence[tuple[int, int]]) -> list[Known]:
        """Videos (tombstones included) whose (device, inode) is one of ``identities``."""
        ...

    async def live_below(self, directory: bytes, device: int) -> tuple[int, int]:
        """How many present videos lie below ``directory``, and how many of them on
        ``device``."""
        ...

    async def commit(self, changes: DirectoryChanges) -> ScanCounts:
        """Apply one directory's changes and add their counts to the job's, atomically.

        Returns the counts as applied: ``changes.counts`` plus moved, restored and removed.
        """
        ...

    async def job_counts(self, job_id: str) -> ScanCounts:
        """The counts committed for a job so far."""
        ...

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
        """Videos ordered by path; ``roots`` (when given) keeps only those below one."""
        ...

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
        """As :meth:`list_videos`, with the change sequence the page was read at."""
        ...

    async def changes_after(self, after: int, path_prefix: bytes, limit: int) -> list[VideoChange]:
        """Up to ``limit`` changes after sequence ``after``, in order, of paths (or previous
        paths) starting with ``path_prefix``.

        Raises:
            OutOfRange: (HISTORY_EXPIRED) the changes after ``after`` are not all kept.
        """
        ...

    async def prune_changes(self, before_ns: int) -> int:
        """Forget the changes committed before ``before_ns``; returns how many."""
        ...

    async def list_failures(
        self, *, path_prefix: bytes, page_size: int, page_token: str, roots: Sequence[bytes] = ()
    ) -> FailurePage:
        """Remembered failures ordered by path; ``roots`` as for :meth:`list_videos`."""
        ...

    async def purge_missing(self, before_ns: int) -> int:
        """Delete tombstones older than ``before_ns``; returns how many."""
        ...

    async def purge_outside(self, roots: Sequence[bytes]) -> int:
        """Delete every row (videos, failures) not below one of ``roots``; returns how many."""
        ...

    async def close(self) -> None: ...


def parent_dir(path: bytes) -> bytes:
    """The directory a path is directly in (``/a/b.mp4`` -> ``/a``; ``/b.mp4`` -> ``/``)."""
    return os.path.dirname(path) or b"/"


def ancestors(directory: bytes) -> list[tuple[bytes, bytes]]:
    """(directory, parent) pairs from ``directory`` up to, not including, ``/``."""
    pairs = []
    while directory not in (b"/", b""):
        parent = parent_dir(directory)
        pairs.append((directory, parent))
        directory = parent
    return pairs


def below(directory: bytes) -> tuple[bytes, bytes]:
    """The half-open byte range [low, high) of every path strictly below ``directory``."""
    base = directory.rstrip(b"/") + b"/"
    return base, base[:-1] + b"0"  # "0" is the byte after "/"


def under_roots(path: bytes, roots: Sequence[bytes]) -> bool:
    """True if ``path`` lies below one of ``roots``; an empty ``roots`` admits everything."""
    return not roots or any(path.startswith(r.rstrip(b"/") + b"/") for r in roots)


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
    """A catalog in dicts: the test double of the SQL catalogs."""

    def __init__(self) -> None:
        self._videos: dict[bytes, Video] = {}
        self._failures: dict[bytes, Failure] = {}
        self._dirs: dict[bytes, bytes] = {}  # directory -> parent
        self._counts: dict[str, ScanCounts] = {}
        self._changes: list[VideoChange] = []
        self._sequence = 0
        self._pruned_through = 0
        self._feed = ChangeFeed()

    @property
    def feed(self) -> ChangeFeed:
        return self._feed

    def _log(
        self, kind: ChangeKind, video: Video, now_ns: int, previous: bytes | None = None
    ) -> None:
        self._sequence += 1
        self._changes.append(VideoChange(self._sequence, kind, video, previous, now_ns))

    async def read_directory(self, directory: bytes) -> DirectoryRows:
        return DirectoryRows(
            {p: Known.of(v) for p, v in self._videos.items() if parent_dir(p) == directory},
            {p: f for p, f in self._failures.items() if parent_dir(p) == directory},
            frozenset(d for d, parent in self._dirs.items() if parent == directory),
        )

    async def find_identities(self, identities: Sequence[tuple[int, int]]) -> list[Known]:
        wanted = set(identities)
        return [Known.of(v) for v in self._videos.values() if (v.device, v.inode) in wanted]

    async def live_below(self, directory: bytes, device: int) -> tuple[int, int]:
        low, high = below(directory)
        live = [v for p, v in self._videos.items() if low <= p < high and v.missing_ns is None]
        return len(live), sum(v.device == device for v in live)

    async def commit(self, changes: DirectoryChanges) -> ScanCounts:
        c = changes
        moved, unremoved = self._move(c)
        for video in c.probed:
            old = self._videos.get(video.path)
            new = self._videos[video.path] = replace(
                video,
                first_seen_ns=old.first_seen_ns if old else c.now_ns,
                last_seen_ns=c.now_ns,
                job_id=c.job_id,
                missing_ns=None,
            )
            live = old is not None and old.missing_ns is None
            self._log(ChangeKind.UPDATED if live else ChangeKind.ADDED, new, c.now_ns)
            self._failures.pop(video.path, None)
        self._see(c.seen, c.now_ns, restore=False)
        restored = self._see(c.restored, c.now_ns, restore=True)
        for failure in c.failures:
            self._failures[failure.path] = replace(failure, job_id=c.job_id, time_ns=c.now_ns)
        removed = self._tombstone(c.missing, c.gone_dirs, c.now_ns)
        if c.writes_rows():
            self._dirs.update(ancestors(c.directory))
        counts = replace(c.counts, moved=moved, restored=restored, removed=removed - unremoved)
        self._counts[c.job_id] = self._counts.get(c.job_id, ScanCounts()) + counts
        if c.probed or moved or restored or removed:
            self._feed.wake()
        return counts

    def _move(self, c: DirectoryChanges) -> tuple[int, int]:
        moved = unremoved = 0
        for old_path, new_path, device, inode in c.moved:
            row = self._videos.pop(old_path, None)
            if row is None:
                continue
            if row.missing_ns is not None and row.missing_ns >= c.since_ns:
                unremoved += 1
            new = self._videos[new_path] = replace(
                row, path=new_path, device=device, inode=inode, missing_ns=None,
                last_seen_ns=c.now_ns,
            )  # fmt: skip
            self._log(ChangeKind.MOVED, new, c.now_ns, old_path)
            self._failures.pop(new_path, None)
            moved += 1
        return moved, unremoved

    def _see(self, sightings: Iterable[Sighting], now_ns: int, *, restore: bool) -> int:
        applied = 0
        for path, device, inode in sightings:
            row = self._videos.get(path)
            if row is None or (row.missing_ns is not None) != restore:
                continue
            self._videos[path] = replace(
                row, last_seen_ns=now_ns, device=device, inode=inode, missing_ns=None
            )
            if restore:
                self._log(ChangeKind.RESTORED, self._videos[path], now_ns)
            applied += 1
        return applied

    def _tombstone(self, paths: Iterable[bytes], gone_dirs: Iterable[bytes], now_ns: int) -> int:
        doomed = set(paths)
        for directory in gone_dirs:
            low, high = below(directory)
            doomed.update(p for p in [*self._videos, *self._failures] if low <= p < high)
        removed = 0
        for path in sorted(doomed):
            self._failures.pop(path, None)
            row = self._videos.get(path)
            if row is not None and row.missing_ns is None:
                self._videos[path] = replace(row, missing_ns=now_ns)
                self._log(ChangeKind.REMOVED, self._videos[path], now_ns)
                removed += 1
        return removed

    async def job_counts(self, job_id: str) -> ScanCounts:
        return self._counts.get(job_id, ScanCounts())

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
        matching = [
            v
            for v in _page_from(self._videos, path_prefix, page_token, roots)
            if (not job_id or v.job_id == job_id) and (include_missing or v.missing_ns is None)
        ]
        page = matching[:page_size]
        return page, encode_page_token(page[-1].path) if len(matching) > page_size else ""

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
        page, token = await self.list_videos(
            path_prefix=path_prefix, job_id=job_id, page_size=page_size,
            page_token=page_token, include_missing=include_missing, roots=roots,
        )  # fmt: skip
        return page, token, self._sequence

    async def changes_after(self, after: int, path_prefix: bytes, limit: int) -> list[VideoChange]:
        check_history(after, pruned_through=self._pruned_through, high_water=self._sequence)

        def matches(c: VideoChange) -> bool:
            paths = (c.video.path, c.previous_path) if c.previous_path else (c.video.path,)
            return any(p.startswith(path_prefix) for p in paths)

        return [c for c in self._changes if c.sequence > after and matches(c)][:limit]

    async def prune_changes(self, before_ns: int) -> int:
        doomed = [c for c in self._changes if c.time_ns < before_ns]
        if doomed:
            self._pruned_through = max(self._pruned_through, doomed[-1].sequence)
            self._changes = [c for c in self._changes if c.sequence > self._pruned_through]
        return len(doomed)

    async def list_failures(
        self, *, path_prefix: bytes, page_size: int, page_token: str, roots: Sequence[bytes] = ()
    ) -> FailurePage:
        matching = list(_page_from(self._failures, path_prefix, page_token, roots))
        page = matching[:page_size]
        return page, encode_page_token(page[-1].path) if len(matching) > page_size else ""

    async def purge_missing(self, before_ns: int) -> int:
        doomed = [
            p
            for p, v in self._videos.items()
            if v.missing_ns is not None and v.missing_ns < before_ns
        ]
        for path in doomed:
            del self._videos[path]
        return len(doomed)

    async def purge_outside(self, roots: Sequence[bytes]) -> int:
        count = 0
        now_ns = time.time_ns()
        for path, row in sorted(self._videos.items()):
            if row.missing_ns is None and not under_roots(path, roots):
                self._log(ChangeKind.REMOVED, replace(row, missing_ns=now_ns), now_ns)
        for table in (self._videos, self._failures):
            doomed = [p for p in table if not under_roots(p, roots)]
            for path in doomed:
                del table[path]
            count += len(doomed)
        return count

    async def close(self) -> None:
        return None


_Row = TypeVar("_Row")


def _page_from(
    rows: dict[bytes, _Row], prefix: bytes, page_token: str, roots: Sequence[bytes]
) -> Iterable[_Row]:
    after = decode_page_token(page_token) if page_token else None
    for path, row in sorted(rows.items()):
        if path.startswith(prefix) and (after is None or path > after) and under_roots(path, roots):
            yield row
