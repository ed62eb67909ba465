"""The video catalog seam: one record per video file, keyed by its absolute path (raw bytes).

Paths are the exact bytes the file system gave, so names that are not valid UTF-8 survive a
round trip. Scans work per directory: :meth:`Catalog.read_directory` reads the rows of one
directory in one indexed read, :meth:`Catalog.commit` writes that directory's changes
(probed files, moves, restores, tombstones, remembered failures) together with the counts
they make, in one transaction. ``server.catalog_memory.InMemoryCatalog`` is the test double of
``server.store.SqliteCatalog`` and ``server.pgstore.PgCatalog``; one contract suite runs
over all three.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Protocol

from .changes import ChangeFeed, VideoChange
from .errors import InvalidArgument
from .probe import MediaInfo

__all__ = [
    "Catalog",
    "DirectoryChanges",
    "DirectoryRows",
    "Failure",
    "FailurePage",
    "FileStamp",
    "Known",
    "Listing",
    "Move",
    "ScanCounts",
    "Sighting",
    "Summary",
    "Video",
    "VideoPage",
    "ancestors",
    "below",
    "decode_page_token",
    "encode_page_token",
    "new_generation",
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


class Summary(NamedTuple):
    """A directory's listing as a digest, stored with the commit that made its rows agree
    with that listing (``server.reconcile``): while the digest stands, a listing with the same
    digest needs nothing written, and its rows need not be read.

    Every other write to the directory's rows (another job's commit in it, a move out of it,
    a folder above it found gone) clears the digest and moves the directory's generation on;
    the digest is stored only if the generation is still the one read with the rows.

    Attributes:
        digest: of the listing (``server.reconcile``).
        seen_ns: the oldest last-seen time of its present rows after the commit: the digest
            is trusted only while no row would be stale.
        gen: the directory's generation read with its rows; None when it was not catalogued.
    """

    digest: bytes
    seen_ns: int
    gen: int | None


def new_generation() -> int:
    """The generation of a newly catalogued directory: random, so that a directory pruned
    and catalogued again never takes up the generation a reader saw before."""
    return secrets.randbits(62)


@dataclass(frozen=True, slots=True)
class DirectoryRows:
    """What the catalog holds for one directory.

    Attributes:
        videos: the videos directly in it, tombstones included, by path; not read (empty)
            when ``settled``.
        failures: the remembered failures directly in it, by path.
        subdirs: catalogued directories directly below it (full paths).
        gen: its generation (see :class:`Summary`); None when it is not catalogued.
        settled: its stored digest is the one asked for, and fresh: its rows agree with
            that listing.
    """

    videos: dict[bytes, Known] = field(default_factory=dict)
    failures: dict[bytes, Failure] = field(default_factory=dict)
    subdirs: frozenset[bytes] = frozenset()
    gen: int | None = None
    settled: bool = False


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
        gone_dirs: catalogued subdirectories that are gone: everything below them likewise,
            and they (and the directories below them) are no longer catalogued directories:
            their parent lists as settled again; their tombstones stay until purged.
        counts: added, updated, unchanged and failed as the scan counted them; the catalog
            adds moved, restored and removed as it applied them. They are committed with
            the rows they count; a directory with no row to write commits nothing.
        summary: the listing's digest, stored if the directory's rows were not written by
            anyone else since they were read; None clears the stored one.
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
    summary: Summary | None = None

    def writes_anything(self) -> bool:
        """True when a row changes (a summary is one); counts alone are not written (they
        count no row)."""
        return bool(
            self.probed or self.seen or self.restored or self.moved or self.failures
            or self.missing or self.gone_dirs or self.summary
        )  # fmt: skip

    def unsettled(self) -> list[bytes]:
        """The other directories whose rows it writes (the old directories of moves) and
        the ``gone_dirs``: their digests are cleared (``gone_dirs`` are forgotten)."""
        moved_from = {parent_dir(m.old_path) for m in self.moved}
        return sorted((moved_from | set(self.gone_dirs)) - {self.directory})

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

    async def read_directory(
        self, directory: bytes, digest: bytes = b"", fresh_after_ns: int = 0
    ) -> DirectoryRows:
        """The rows of one directory, in one indexed read; its videos are not read when its
        stored :class:`Summary` has ``digest`` and a ``seen_ns`` of ``fresh_after_ns`` or
        later (then the result is ``settled``)."""
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
    return path[: path.rfind(b"/") + 1].rstrip(b"/") or b"/"  # once per file: not dirname


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
