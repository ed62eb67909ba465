"""The scan job: hand the directories of a folder to the scan workers, one at a time each.

::

    frontier of directories (names only) -> lanes, one per worker: a worker lists the
    directory (its sub-folders join the frontier), reconciles it with the catalog and commits
    (server.scanworker) -> its summaries become the job's progress

The server never touches a file here, and holds no list of the tree: only the names of the
directories still to hand out. What a job reports at its end is read back from the counts its
workers committed with their rows, so a cancel (which kills the workers in flight) or a crash
can never make the report and the catalog disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from .catalog import Catalog, ScanCounts
from .errors import StorageFault
from .jobs import FileError, Job, Phase, Progress, ScanResult, display_path
from .roots import Folder, RootPolicy
from .runner import JobContext
from .scan_wire import Committed, DirectoryTask, Listed, Reply
from .scanpool import WorkerDied
from .walk import Candidate, WalkError, walk

__all__ = [
    "DEFAULT_EXTENSIONS",
    "Candidate",
    "Directories",
    "ScanConfig",
    "Scanner",
    "WalkError",
    "walk",
]

DEFAULT_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"})
# Directories per round trip to a worker, at most: on a busy machine each round trip waits for
# the server to be scheduled, so a rescan of unchanged folders takes few of them.
_MAX_BATCH = 256
_REPORT_EVERY_S = 0.02  # progress from one job's replies, at most this often


class Directories(Protocol):
    """Where directories are done: ``server.scanpool.ScanWorkers`` (worker processes), or
    ``server.scanworker.LocalDirectories`` (in-process, for tests)."""

    async def run(self, task: DirectoryTask, on_reply: Callable[[Reply], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Tunables of a scan.

    Attributes:
        extensions: lower-case file extensions, with the dot, that mark a video.
        batch_size: files probed and committed together within a directory (a directory
            of 100,000 files commits, and reports, in steps of this many).
        probe_batch: files per round trip to a probe worker; a batch's chunks are probed
            in parallel.
        lanes: directories of one job in flight at once (one per scan worker).
        seen_resolution_ns: how stale an unchanged file's last-seen time may get before a
            rescan writes it again; a rescan within it writes nothing for unchanged files.
        max_errors: per-file errors kept per job; the rest are only counted.
        missing_retention_ns: how long a missing video is kept before a scan purges it.
        history_ns: how long the catalog's changes are kept (``server.changes``).
    """

    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    batch_size: int = 128
    probe_batch: int = 16
    lanes: int = 2
    seen_resolution_ns: int = 3600 * 10**9
    max_errors: int = 50
    missing_retention_ns: int = 30 * 24 * 3600 * 10**9
    history_ns: int = 7 * 24 * 3600 * 10**9


class _Frontier:
    """The directories of a job still to hand out (names, depth first), and how many are
    being done."""

    def __init__(self) -> None:
        self._pending: list[bytes] = [b""]
        self._busy = 0
        self._unlisted = 0
        self._changed = asyncio.Event()

    @property
    def walking(self) -> bool:
        """True while directories may still be found."""
        return bool(self._pending) or self._unlisted > 0

    async def take(self, lanes: int) -> list[bytes]:
        """The next directories for one lane (empty once every directory is done): one, or
        while many are waiting, a share of them, so that a tree of small folders costs few
        round trips to the workers."""
        while not self._pending:
            if self._busy == 0:
                return []
            self._changed.clear()
            await self._changed.wait()
        count = max(1, min(_MAX_BATCH, len(self._pending) // (2 * lanes)))
        taken = self._pending[-count:][::-1]
        del self._pending[-count:]
        self._busy += 1
        self._unlisted += count
        return taken

    def listed(self, folders: Sequence[bytes]) -> None:
        """A directory taken was listed, with these sub-folders."""
        self._pending.extend(reversed(folders))  # popped in listing order
        self._unlisted -= 1
        self._changed.set()

    def finished(self, unlisted: int, again: Sequence[bytes] = ()) -> None:
        """A lane's directories are done, ``unlisted`` of them without saying so; ``again``
        (some of those) were never started, and wait to be handed out again."""
        self._busy -= 1
        self._unlisted -= unlisted
        self._pending.extend(reversed(again))
        self._changed.set()


@dataclass(slots=True)
class _Tally:
    """Running counts of one job, as its workers committed them; every update is reported at
    once."""

    ctx: JobContext
    max_errors: int
    frontier: _Frontier
    found: int = 0
    counts: ScanCounts = field(default_factory=ScanCounts)
    unwritten: ScanCounts = field(default_factory=ScanCounts)  # reported, with no row
    current: str = ""
    errors: list[FileError] = field(default_factory=list)
    error_count: int = 0
    reported_at: float = 0.0
    dirty: bool = False
    later: asyncio.TimerHandle | None = None

    def stop(self) -> None:
        """Forget any report held back (the job is ending: its last report is explicit)."""
        if self.later is not None:
            self.later.cancel()
            self.later = None
        self.dirty = False

    def _catch_up(self) -> None:
        self.later = None
        if self.dirty:
            self.report(now=True)

    def listed(self, reply: Listed) -> None:
        """A worker listed a directory."""
        self.found += reply.found
        if reply.error is not None:
            self.note(*reply.error)
        self.report()

    @property
    def errors_wanted(self) -> int:
        """Per-file errors the job still keeps."""
        return self.max_errors - len(self.errors)

    def note(self, path: bytes, message: str) -> None:
        """A per-file (or per-directory) error."""
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(FileError(display_path(path), message))

    def committed(self, reply: Committed) -> None:
        """A worker's commit landed, with these counts and errors."""
        self.counts = self.counts + reply.counts
        if not reply.written:
            self.unwritten = self.unwritten + reply.counts
        for path, message in reply.errors:
            self.note(path, message)
        self.error_count += reply.errors_dropped
        self.current = display_path(reply.current)
        self.report()

    def result(self) -> ScanResult:
        c = self.counts
        return ScanResult(
            added=c.added,
            updated=c.updated,
            unchanged=c.unchanged,
            failed=c.failed,
            errors=tuple(self.errors),
            error_count=self.error_count,
            moved=c.moved,
            restored=c.restored,
            # A file that a concurrent job marked missing and this one found moved is taken
            # off this job's removed count: the count never goes below none.
            removed=max(0, c.removed),
        )

    def report(self, *, now: bool = False) -> None:
        """Publish the progress, at most every ``_REPORT_EVERY_S`` unless ``now``; what is
        held back is published when that time is up."""
        clock = time.monotonic()
        if not now and clock - self.reported_at < _REPORT_EVERY_S:
            self.dirty = True
            if self.later is None:
                delay = self.reported_at + _REPORT_EVERY_S - clock
                self.later = asyncio.get_running_loop().call_later(delay, self._catch_up)
            return
        self.stop()
        self.reported_at = clock
        result = self.result()
        progress = Progress(
            phase=Phase.DISCOVERING if self.frontier.walking else Phase.PROBING,
            files_found=self.found,
            files_done=result.scanned,
            current_path=self.current,
        )
        self.ctx.report(progress, result)


class Scanner:
    """The job handler of scan jobs: the coordinator of its directories.

    Args:
        roots: the allowed roots; the job's path is checked again when it starts.
        directories: where directories are done (the scan workers).
        catalog: the catalog the workers commit to; the job's counts are read back from it.
        config: tunables.
        clock_ns: wall clock in nanoseconds, for first/last-seen and missing times (the
            workers' clocks are set to it).
        locate: finds the job's folder, within ``--io-timeout`` (the server's root-check
            helper process: no server thread ever waits on a share); by default
            :meth:`RootPolicy.locate` on a thread.
    """

    def __init__(
        self,
        roots: RootPolicy,
        directories: Directories,
        catalog: Catalog,
        config: ScanConfig | None = None,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        locate: Callable[[str], Awaitable[Folder]] | None = None,
    ) -> None:
        self._locate = locate or self._locate_here
        self._roots = roots
        self._directories = directories
        self._catalog = catalog
        self._config = config or ScanConfig()
        self._clock_ns = clock_ns

    async def _locate_here(self, path: str) -> Folder:
        return await asyncio.to_thread(self._roots.locate, path)

    async def __call__(self, job: Job, ctx: JobContext) -> ScanResult:
        """Run one scan job; see :data:`server.queue.JobHandler` for the cancel contract."""
        # The path is checked again (the filesystem may have changed), within --io-timeout:
        # a folder on a share that stopped answering fails the job, never hangs it.
        folder = await self._locate(job.spec.path)
        config = self._config
        started_ns = self._clock_ns()
        await self._catalog.purge_missing(started_ns - config.missing_retention_ns)
        await self._catalog.prune_changes(started_ns - config.history_ns)
        # A resumed job counts again from the start: what it committed before counts as
        # unchanged now, so only what this run commits is its result.
        before = await self._catalog.job_counts(job.id)
        frontier = _Frontier()
        tally = _Tally(ctx, config.max_errors, frontier)
        tally.report()  # announces the DISCOVERING phase
        task = partial(DirectoryTask, job.id, started_ns, job.spec.reprobe, job.spec.recursive,
                       folder)  # fmt: skip
        try:
            async with asyncio.TaskGroup() as lanes:
                for _ in range(config.lanes):
                    lanes.create_task(self._lane(frontier, tally, task, ctx, folder.path))
        except ExceptionGroup as group:
            # The first lane's failure ends the job, as itself: a domain error keeps its
            # reason (a full disk, a lost database) instead of hiding in a group.
            raise group.exceptions[0] from group
        finally:
            await self._settle(tally, job.id, before)
        return tally.result()

    async def _lane(
        self,
        frontier: _Frontier,
        tally: _Tally,
        task: Callable[[tuple[bytes, ...], int, int], DirectoryTask],
        ctx: JobContext,
        folder: bytes,
    ) -> None:
        # The task cancel interrupts whatever a lane awaits; the token check between
        # directories is the safety net should a library swallow that cancel.
        lanes = self._config.lanes
        while not ctx.cancelled and (directories := await frontier.take(lanes)):
            unlisted = len(directories)

            def on_reply(reply: Reply) -> None:
                nonlocal unlisted
                if isinstance(reply, Listed):
                    unlisted -= 1
                    frontier.listed(reply.folders)
                    tally.listed(reply)
                elif isinstance(reply, Committed):
                    tally.committed(reply)
                    if _changes_catalog(reply.counts):
                        self._catalog.feed.wake()  # the workers commit on their own connections

            again: list[bytes] = []
            try:
                offset = self._clock_ns() - time.time_ns()
                work = task(tuple(directories), offset, tally.errors_wanted)
                await self._directories.run(work, on_reply)
                # A worker whose filesystem stopped answering left the rest undone.
                again = directories[len(directories) - unlisted :] if unlisted else []
            except WorkerDied as exc:
                # It died in the last directory it listed (or in the first); the ones after
                # that were never started: they go to another worker.
                where = max(len(directories) - unlisted - 1, 0)
                again = directories[where + 1 :]
                path = directories[where]
                tally.note(folder + b"/" + path if path else folder, str(exc))
            finally:
                frontier.finished(unlisted, again)

    async def _settle(self, tally: _Tally, job_id: str, before: ScanCounts) -> None:
        """Make the job's counts what its workers committed, plus what they reported with
        no row to write (a worker killed by a cancel may have committed more than it could
        say)."""
        tally.stop()
        with contextlib.suppress(StorageFault):
            committed = await self._catalog.job_counts(job_id)
            tally.counts = committed - before + tally.unwritten
        tally.report(now=True)


def _changes_catalog(counts: ScanCounts) -> bool:
    return bool(counts.added or counts.updated or counts.moved or counts.restored
                or counts.removed)  # fmt: skip
