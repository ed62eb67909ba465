"""The catalog in dicts: the test double of ``server.store.SqliteCatalog`` and
``server.pgstore.PgCatalog`` (one contract suite runs over all three)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from .catalog import (
    DirectoryChanges,
    DirectoryRows,
    Failure,
    FailurePage,
    Known,
    Listing,
    ScanCounts,
    Sighting,
    Video,
    VideoPage,
    ancestors,
    below,
    decode_page_token,
    encode_page_token,
    new_generation,
    parent_dir,
    under_roots,
)
from .changes import ChangeFeed, ChangeKind, VideoChange, check_history

__all__ = ["InMemoryCatalog"]


class InMemoryCatalog:
    """A catalog in dicts: the test double of the SQL catalogs."""

    def __init__(self) -> None:
        self._videos: dict[bytes, Video] = {}
        self._failures: dict[bytes, Failure] = {}
        self._dirs: dict[bytes, bytes] = {}  # directory -> parent
        self._gens: dict[bytes, int] = {}  # directory -> generation
        self._summaries: dict[bytes, tuple[bytes, int]] = {}  # directory -> digest, seen_ns
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

    async def read_directory(
        self, directory: bytes, digest: bytes = b"", fresh_after_ns: int = 0
    ) -> DirectoryRows:
        stored = self._summaries.get(directory, (b"", 0))
        settled = bool(digest) and stored[0] == digest and stored[1] >= fresh_after_ns
        return DirectoryRows(
            {} if settled else
            {p: Known.of(v) for p, v in self._videos.items() if parent_dir(p) == directory},
            {p: f for p, f in self._failures.items() if parent_dir(p) == directory},
            frozenset(d for d, parent in self._dirs.items() if parent == directory),
            self._gens.get(directory),
            settled,
        )  # fmt: skip

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
        fresh = new_generation() if c.writes_rows() else -1
        for directory, parent in ancestors(c.directory) if c.writes_rows() else ():
            if directory not in self._dirs:
                self._dirs[directory], self._gens[directory] = parent, fresh
        self._settle(c, fresh)
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

    def _settle(self, c: DirectoryChanges, fresh: int) -> None:
        """Clear the digests of the directories ``c`` unsettles; store its own summary if
        its directory's generation is still the one read (``fresh``: catalogued by ``c``)."""
        ranges = [below(d) for d in c.gone_dirs]
        for d in [d for d in self._dirs if d in c.gone_dirs or _within(d, ranges)]:
            self._forget(d)
        for d in set(c.unsettled()) & self._gens.keys():
            self._gens[d] += 1
            self._summaries.pop(d, None)
        gen, s = self._gens.get(c.directory), c.summary
        if gen is None:
            return
        self._gens[c.directory] = gen + 1
        self._summaries.pop(c.directory, None)
        if s is not None and gen == (fresh if s.gen is None else s.gen):
            self._summaries[c.directory] = (s.digest, s.seen_ns)

    def _forget(self, directory: bytes) -> None:
        del self._dirs[directory], self._gens[directory]
        self._summaries.pop(directory, None)

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
        if doomed:  # directories with nothing left below them are no longer catalogued
            kept = [*self._videos, *self._failures]
            for d in [d for d in self._dirs if not _any_below(d, kept)]:
                self._forget(d)
        return len(doomed)

    async def purge_outside(self, roots: Sequence[bytes]) -> int:
        count = 0
        now_ns = time.time_ns()
        self._summaries.clear()
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


def _within(path: bytes, ranges: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(low <= path < high for low, high in ranges)


def _any_below(directory: bytes, paths: Iterable[bytes]) -> bool:
    low, high = below(directory)
    return any(low <= p < high for p in paths)


def _page_from(
    rows: dict[bytes, _Row], prefix: bytes, page_token: str, roots: Sequence[bytes]
) -> Iterable[_Row]:
    after = decode_page_token(page_token) if page_token else None
    for path, row in sorted(rows.items()):
        if path.startswith(prefix) and (after is None or path > after) and under_roots(path, roots):
            yield row
