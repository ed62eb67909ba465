"""Reconciliation of one directory: compare its listing with its catalog rows, probe what
changed, and commit the directory's changes with the counts they make.

::

    read the directory's rows (one indexed read) -> compare with the listing -> look moves up
    by (device, inode) -> probe new and changed files in chunks, committing each chunk ->
    commit the rest: unchanged, restored, moved, and (only for a complete listing) missing

The rules that keep a library safe live here:

- Only a completely listed directory marks anything missing; a directory the walk could not
  read, or finished reading, marks nothing.
- A directory that is now empty while the catalog holds videos below it is reconciled only if
  it is on the device those videos were on: an unmounted share's mount point keeps them.
- A file is moved (its row, with its probe data, goes to the new path) only if its old path
  is gone: in the same directory by the listing, elsewhere because the row is already
  missing or the old path no longer holds that file.
- A file that failed to probe is not opened again while its size and mtime are unchanged.
- A directory's commit stores a digest of its listing (``server.catalog.Summary``); a
  listing with the same digest, while no other write to the directory's rows cleared it and
  no row would be stale, is reconciled without reading its videos: the rows agree with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import marshal
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter

from .catalog import (
    Catalog,
    DirectoryChanges,
    DirectoryRows,
    Failure,
    Known,
    Move,
    ScanCounts,
    Sighting,
    Summary,
    Video,
    under_roots,
)
from .fsopen import open_beneath
from .probe import ProbeFailure, Prober
from .roots import RootPolicy
from .walk import Candidate, Listing, Stamp, WalkError

__all__ = ["DirectoryScan", "Reported"]

# Committed counts, the per-file errors behind them, the last path covered, and whether the
# counts were written with rows (False: nothing to write, such as an unchanged folder).
Reported = Callable[[ScanCounts, Sequence[tuple[bytes, str]], bytes, bool], None]
# What a listing's digest takes of each file: path, size, mtime, device, inode; and its key.
_PATH = itemgetter(0)


@dataclass(slots=True)
class _Plan:
    """What one directory needs, as the comparison found it."""

    changes: DirectoryChanges
    to_probe: list[Candidate] = field(default_factory=list)
    known: set[bytes] = field(default_factory=set)  # paths of probed files that had a row
    maybe_moved: list[Candidate] = field(default_factory=list)
    errors: list[tuple[bytes, str]] = field(default_factory=list)
    unchanged: int = 0
    failed: int = 0
    # Rows (videos, failures) whose file the listing holds: when they are all the rows,
    # nothing is missing, which a rescan learns without building the set of listed paths.
    matched_videos: int = 0
    matched_failures: int = 0
    # The oldest last-seen time of the rows left as they were, for the summary; and whether
    # the rows will agree with the listing (not so for an empty mount point's).
    oldest_seen_ns: int = 0
    settles: bool = True


@dataclass(frozen=True, slots=True)
class DirectoryScan:
    """Reconciles the directories of one job, one :class:`Listing` at a time.

    Attributes:
        catalog, prober: where rows live, and what probes files.
        job_id: the job; ``since_ns`` its start.
        reprobe: probe every file again.
        recursive: the job descends, so catalogued subdirectories that are gone are missing.
        roots: the allowed roots: a move's old path is looked at only beneath one, by
            descriptor, never through a symlink.
        clock_ns: wall clock.
        seen_resolution_ns: see ``ScanConfig``.
        chunk: files probed and committed together.
        probe_batch: files per probe worker round trip.
        report: receives each commit's counts and errors.
        io_timeout_s: how long a look at a move's old path may take; past it the old path
            counts as still there.
    """

    catalog: Catalog
    prober: Prober
    job_id: str
    since_ns: int
    reprobe: bool
    recursive: bool
    roots: RootPolicy
    clock_ns: Callable[[], int]
    seen_resolution_ns: int
    chunk: int
    probe_batch: int
    report: Reported
    io_timeout_s: float = 30.0

    async def __call__(self, listing: Listing) -> None:
        """Reconcile one directory."""
        stamps, unreadable = listing.stamps(), listing.errors
        digest = _digest(stamps, unreadable) if listing.complete else b""
        fresh_after = self.clock_ns() - self.seen_resolution_ns
        trusted = b"" if self.reprobe else digest
        rows = await self.catalog.read_directory(listing.path, trusted, fresh_after)
        if rows.settled and not self._gone_dirs(listing, rows):
            self._report_settled(listing.path, stamps, unreadable, rows)
            return
        files = listing.files
        if rows.settled:  # a catalogued sub-directory is gone: reconcile it all
            rows = await self.catalog.read_directory(listing.path)
        plan = self._compare(listing.path, files, unreadable, rows)
        if plan.maybe_moved:
            await self._find_moves(plan, listing, files, unreadable)
        todo = plan.to_probe
        for start in range(0, len(todo), self.chunk):
            part = todo[start : start + self.chunk]
            last = start + self.chunk >= len(todo)
            probed, errors = await self._probe(listing.path, part, plan.known)
            if last:
                plan.changes = _merge(plan.changes, probed)
                plan.errors += errors
            else:  # a large directory: commit what is probed as it goes (never a removal)
                await self._commit(probed, errors, part[-1].path)
        c = plan.changes
        if listing.complete:
            await self._reconcile(plan, listing, rows, files, unreadable)
            if plan.settles and len(todo) <= self.chunk:  # chunks moved the generation on
                c.summary = Summary(digest, plan.oldest_seen_ns, rows.gen)
        if c.summary is not None and not c.writes_rows() and rows.gen is None:
            c.summary = None  # not catalogued: nowhere to keep it
        c.counts = c.counts + ScanCounts(unchanged=plan.unchanged, failed=plan.failed)
        await self._commit(c, plan.errors, listing.path)

    def _gone_dirs(self, listing: Listing, rows: DirectoryRows) -> list[bytes]:
        """Catalogued sub-directories that the listing does not hold (if the job descends)."""
        return sorted(rows.subdirs - set(listing.subdirs)) if self.recursive else []

    def _report_settled(
        self, directory: bytes, stamps: list[Stamp], errors: list[WalkError], rows: DirectoryRows
    ) -> None:
        """Report a directory whose rows agree with its listing: what a comparison would
        count, with nothing to write."""
        found = [(e.path, e.message) for e in errors]
        failures = rows.failures
        if failures:  # remembered failures of files still there are failed again
            found += [(s[0], failures[s[0]].message) for s in stamps if s[0] in failures]
        remembered = len(found) - len(errors)
        counts = ScanCounts(unchanged=len(stamps) - remembered, failed=len(found))
        self.report(counts, found, directory, False)

    def _changes(self, directory: bytes) -> DirectoryChanges:
        return DirectoryChanges(self.job_id, directory, self.clock_ns(), self.since_ns)

    def _compare(
        self, directory: bytes, files: list[Candidate], errors: list[WalkError],
        rows: DirectoryRows,
    ) -> _Plan:  # fmt: skip
        plan = _Plan(self._changes(directory))
        plan.oldest_seen_ns = plan.changes.now_ns
        for error in errors:
            plan.failed += 1
            plan.errors.append((error.path, error.message))
        videos, failures = rows.videos, rows.failures
        stale_before = plan.changes.now_ns - self.seen_resolution_ns
        unchanged, oldest = 0, plan.oldest_seen_ns
        for file in files:
            row = videos.get(file.path)
            if (  # the common case of a rescan, tested first and cheaply: nothing to do
                row is not None
                and not self.reprobe
                and row.mtime_ns == file.mtime_ns
                and row.size_bytes == file.size_bytes
                and row.missing_ns is None
                and row.last_seen_ns >= stale_before
                and row.inode == file.inode
                and row.device == file.device
                and file.path not in failures
            ):
                unchanged += 1
                if row.last_seen_ns < oldest:
                    oldest = row.last_seen_ns
                continue
            self._sort(plan, file, row, failures.get(file.path), stale_before)
        plan.unchanged += unchanged
        plan.matched_videos += unchanged
        plan.oldest_seen_ns = min(oldest, plan.oldest_seen_ns)
        return plan

    def _sort(
        self, plan: _Plan, file: Candidate, row: Known | None, failure: Failure | None,
        stale_before: int,
    ) -> None:  # fmt: skip
        """What one file that is not plainly unchanged needs."""
        plan.matched_videos += row is not None
        plan.matched_failures += failure is not None
        stamp = file.stamp
        if self.reprobe:
            plan.to_probe.append(file)
            if row is not None:
                plan.known.add(file.path)
        elif failure is not None and failure.stamp == stamp:
            plan.failed += 1  # remembered: not opened again
            plan.errors.append((file.path, failure.message))
        elif row is not None and row.stamp == stamp:
            _unchanged(plan, file, row, stale_before)
        elif row is not None and row.missing_ns is None:
            plan.to_probe.append(file)  # changed
            plan.known.add(file.path)
        else:
            plan.maybe_moved.append(file)  # new, or back changed: moved from elsewhere?
            if row is not None:
                plan.known.add(file.path)

    async def _find_moves(
        self, plan: _Plan, listing: Listing, files: list[Candidate], errors: list[WalkError]
    ) -> None:
        candidates = plan.maybe_moved
        matches = await self.catalog.find_identities(
            list({(f.device, f.inode) for f in candidates})
        )
        by_identity: dict[tuple[int, int, int, int], list[Known]] = {}
        for row in matches:
            by_identity.setdefault((row.device, row.inode, *row.stamp), []).append(row)
        listed = {f.path for f in files} | {e.path for e in errors}
        for file in candidates:
            rows = by_identity.get((file.device, file.inode, file.size_bytes, file.mtime_ns), [])
            source = await self._moved_from(file, rows, listing, listed)
            if source is not None:
                plan.changes.moved.append(Move(source, file.path, file.device, file.inode))
                listed.add(source)  # one row moves once, even to two new hard links
            else:
                plan.to_probe.append(file)

    async def _moved_from(
        self, file: Candidate, rows: list[Known], listing: Listing, listed: set[bytes]
    ) -> bytes | None:
        """The catalogued path ``file`` was moved from, if its old path is gone."""
        for row in rows:
            if row.path in listed or not under_roots(row.path, self.roots.listed()):
                continue  # still here (a hard link), already moved, or outside the roots
            if row.missing_ns is not None or (
                listing.complete and os.path.dirname(row.path) == listing.path
            ):
                return row.path  # known to be gone
            if await self._gone(row.path, file.device, file.inode):
                return row.path
        return None

    async def _gone(self, path: bytes, device: int, inode: int) -> bool:
        """:func:`_gone` on a thread, with a deadline: no answer counts as still there."""
        look = asyncio.ensure_future(asyncio.to_thread(_gone, self.roots, path, device, inode))
        done, _ = await asyncio.wait([look], timeout=self.io_timeout_s)
        return bool(done) and look.result()

    async def _probe(
        self, directory: bytes, files: list[Candidate], known: set[bytes]
    ) -> tuple[DirectoryChanges, list[tuple[bytes, str]]]:
        size = self.probe_batch
        parts = [files[i : i + size] for i in range(0, len(files), size)]
        results = await asyncio.gather(
            *(self.prober.probe([f.target for f in part]) for part in parts)
        )
        changes = self._changes(directory)
        errors: list[tuple[bytes, str]] = []
        added = updated = 0
        for part, outcomes in zip(parts, results, strict=True):
            for file, outcome in zip(part, outcomes, strict=True):
                if isinstance(outcome, ProbeFailure):
                    changes.failures.append(Failure(file.path, file.stamp, outcome.message))
                    errors.append((file.path, outcome.message))
                    continue
                video = Video(file.path, file.stamp, outcome, 0, 0, "", file.device, file.inode)
                changes.probed.append(video)
                if file.path in known:
                    updated += 1
                else:
                    added += 1
        changes.counts = ScanCounts(added=added, updated=updated, failed=len(errors))
        return changes, errors

    async def _reconcile(
        self, plan: _Plan, listing: Listing, rows: DirectoryRows, files: list[Candidate],
        errors: list[WalkError],
    ) -> None:  # fmt: skip
        c = plan.changes
        everything_listed = plan.matched_videos == len(rows.videos) and (
            plan.matched_failures == len(rows.failures)
        )
        if not everything_listed:
            present = {f.path for f in files} | {e.path for e in errors}
            moved_away = {m.old_path for m in c.moved}
            c.missing = [
                p
                for p, row in rows.videos.items()
                if row.missing_ns is None and p not in present and p not in moved_away
            ]
            c.missing += [p for p in rows.failures if p not in present]
        c.gone_dirs = self._gone_dirs(listing, rows)
        if listing.entries == 0 and (c.missing or c.gone_dirs):
            total, on_device = await self.catalog.live_below(listing.path, listing.device)
            if total and not on_device:
                plan.settles = False
                c.missing, c.gone_dirs = [], []
                message = f"empty mount point, is the share mounted? {total} videos kept"
                plan.errors.append((listing.path, message))

    async def _commit(
        self, changes: DirectoryChanges, errors: Sequence[tuple[bytes, str]], current: bytes
    ) -> None:
        if not changes.writes_anything():
            # Unchanged files and remembered failures: no row to write, so no transaction
            # (most folders of a rescan); their counts are reported all the same.
            self.report(changes.counts, errors, current, False)
            return
        write = asyncio.ensure_future(self.catalog.commit(changes))
        try:
            counts = await asyncio.shield(write)
        except asyncio.CancelledError:
            # A commit is short: let it land so that the report matches the catalog.
            self.report(await write, errors, current, True)
            raise
        self.report(counts, errors, current, True)


def _unchanged(plan: _Plan, file: Candidate, row: Known, stale_before: int) -> None:
    sighting = Sighting(file.path, file.device, file.inode)
    if row.missing_ns is not None:
        plan.changes.restored.append(sighting)
        return
    plan.unchanged += 1
    if row.last_seen_ns < stale_before or (row.device, row.inode) != (file.device, file.inode):
        plan.changes.seen.append(sighting)
    else:
        plan.oldest_seen_ns = min(plan.oldest_seen_ns, row.last_seen_ns)


def _digest(stamps: list[Stamp], errors: list[WalkError]) -> bytes:
    """A digest of a listing: each file's path, size, mtime and identity, and the paths of
    the entries that could not be read, in path order."""
    # Sorted by path: paths are unique in a listing, so this is the order of the whole tuples.
    entries = sorted(stamps, key=_PATH), sorted([e.path for e in errors])
    # marshal's version 2 writes no back-references: equal values, equal bytes
    return hashlib.sha256(marshal.dumps(entries, 2)).digest()


def _merge(changes: DirectoryChanges, probed: DirectoryChanges) -> DirectoryChanges:
    return replace(
        changes,
        probed=changes.probed + probed.probed,
        failures=changes.failures + probed.failures,
        counts=changes.counts + probed.counts,
    )


def _gone(roots: RootPolicy, path: bytes, device: int, inode: int) -> bool:
    """True if the file (device, inode) is no longer at ``path``: nothing is there, or a
    regular file that is another one. Looked up by descriptor beneath its root, never
    through a symlink; anything uncertain (a symlink, an error) counts as still there."""
    where = roots.link_target(path)
    if where is None:
        return False
    root, beneath = where
    parent, name = os.path.split(beneath)
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = open_beneath(root_fd, parent or b".", os.O_PATH | os.O_DIRECTORY)
        finally:
            os.close(root_fd)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) != (device, inode)
