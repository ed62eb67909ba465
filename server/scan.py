"""The scan job: walk a directory, reconcile each directory it lists with the catalog.

::

    walk (thread, by descriptor) -> one listing per directory, a bounded number ahead -> lanes,
    each reconciles one directory at a time (server.reconcile) -> report progress

The walk streams: it never holds the tree in memory, only a few directories' listings.
Progress counts only what is committed, so what a job reports is what the catalog holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .catalog import Catalog, ScanCounts
from .jobs import FileError, Job, Phase, Progress, ScanResult, display_path
from .probe import Prober
from .reconcile import DirectoryScan
from .roots import RootPolicy
from .runner import JobContext
from .walk import Candidate, Listing, WalkError, listings, walk

__all__ = [
    "DEFAULT_EXTENSIONS",
    "Candidate",
    "ScanConfig",
    "Scanner",
    "WalkError",
    "walk",
]

DEFAULT_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"})


class _Feed:
    """Runs a walk in a thread and hands its listings to the event loop, a bounded number
    ahead."""

    def __init__(
        self,
        listings: Iterator[Listing],
        stop: threading.Event,
        on_arrival: Callable[[Listing | None], None],
        ahead: int,
    ) -> None:
        self._listings = listings
        self._on_arrival = on_arrival
        self._stop = stop
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Listing | BaseException | None] = asyncio.Queue()
        self._slots = threading.Semaphore(max(2, ahead))
        self._thread = threading.Thread(target=self._produce, name="walk", daemon=True)
        self._thread.start()

    async def next(self) -> Listing | None:
        """The next listing, or None once the walk ended (for every caller)."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            return None
        self._slots.release()
        if isinstance(item, BaseException):
            self._queue.put_nowait(None)
            raise item
        return item

    def stop(self) -> None:
        """Ask the walk thread to end soon; it never blocks the loop."""
        self._stop.set()

    def _produce(self) -> None:
        try:
            for listing in self._listings:
                while not self._slots.acquire(timeout=0.05):
                    if self._stop.is_set():
                        return
                self._deliver(listing)
        except Exception as exc:  # surfaced to the job on the loop
            self._deliver(exc)
        finally:
            close = getattr(self._listings, "close", None)
            if close is not None:  # a walk holds descriptors: release them in this thread
                close()
            self._deliver(None)

    def _deliver(self, item: Listing | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: Listing | BaseException | None) -> None:
        """On the loop: queue what the walk found and say so (found counts, end of walk)."""
        self._queue.put_nowait(item)
        if not isinstance(item, BaseException):
            self._on_arrival(item)


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Tunables of a scan.

    Attributes:
        extensions: lower-case file extensions, with the dot, that mark a video.
        batch_size: files probed and committed together within a directory.
        probe_batch: files per round trip to a probe worker; a batch's chunks are probed
            in parallel.
        lanes: directories in flight at once.
        seen_resolution_ns: how stale an unchanged file's last-seen time may get before a
            rescan writes it again; a rescan within it writes nothing for unchanged files.
        max_errors: per-file errors kept per job; the rest are only counted.
        walk_ahead: files the walk may find before the probes catch up (counted as
            ``walk_ahead // batch_size`` directories): enough to know the total of most
            libraries early (for a real ETA), while a huge tree still costs bounded memory.
        missing_retention_ns: how long a missing video is kept before a scan purges it.
        history_ns: how long the catalog's changes are kept (``server.changes``).
    """

    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    batch_size: int = 128
    probe_batch: int = 16
    lanes: int = 2
    seen_resolution_ns: int = 3600 * 10**9
    max_errors: int = 50
    walk_ahead: int = 20_000
    missing_retention_ns: int = 30 * 24 * 3600 * 10**9
    history_ns: int = 7 * 24 * 3600 * 10**9


@dataclass(slots=True)
class _Tally:
    """Running counts of one job, as committed; every update is reported at once."""

    ctx: JobContext
    max_errors: int
    found: int = 0
    counts: ScanCounts = field(default_factory=ScanCounts)
    walking: bool = True
    current: str = ""
    errors: list[FileError] = field(default_factory=list)
    error_count: int = 0

    def walked(self, listing: Listing | None) -> None:
        """The walk listed a directory, or (None) ended."""
        if listing is None:
            self.walking = False
        else:
            self.found += len(listing.entry_items())
        self.report()

    def note(self, path: bytes, message: str) -> None:
        """A per-file (or per-directory) error."""
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(FileError(display_path(path), message))

    def committed(
        self, counts: ScanCounts, errors: Sequence[tuple[bytes, str]], current: bytes
    ) -> None:
        """A directory's commit landed, with these counts and errors."""
        self.counts = self.counts + counts
        for path, message in errors:
            self.note(path, message)
        self.current = display_path(current)
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

    def report(self) -> None:
        result = self.result()
        progress = Progress(
            phase=Phase.DISCOVERING if self.walking else Phase.PROBING,
            files_found=self.found,
            files_done=result.scanned,
            current_path=self.current,
        )
        self.ctx.report(progress, result)


class Scanner:
    """The job handler of scan jobs.

    Args:
        roots: the allowed roots; the job's path is checked again when it starts.
        prober: probes changed files.
        catalog: where results go.
        config: tunables.
        clock_ns: wall clock in nanoseconds, for first/last-seen and missing times.
    """

    def __init__(
        self,
        roots: RootPolicy,
        prober: Prober,
        catalog: Catalog,
        config: ScanConfig | None = None,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._roots = roots
        self._prober = prober
        self._catalog = catalog
        self._config = config or ScanConfig()
        self._extensions = frozenset(os.fsencode(e.lower()) for e in self._config.extensions)
        self._clock_ns = clock_ns

    async def __call__(self, job: Job, ctx: JobContext) -> ScanResult:
        """Run one scan job; see :data:`server.queue.JobHandler` for the cancel contract."""
        folder = await asyncio.to_thread(self._roots.locate, job.spec.path)
        config = self._config
        started_ns = self._clock_ns()
        await self._catalog.purge_missing(started_ns - config.missing_retention_ns)
        await self._catalog.prune_changes(started_ns - config.history_ns)
        tally = _Tally(ctx, config.max_errors)
        tally.report()  # announces the DISCOVERING phase
        directory_scan = DirectoryScan(
            self._catalog, self._prober, job.id, started_ns, job.spec.reprobe,
            job.spec.recursive, self._roots, self._clock_ns,
            config.seen_resolution_ns, config.batch_size, config.probe_batch, tally.committed,
        )  # fmt: skip
        stop = threading.Event()
        found = listings(
            folder,
            recursive=job.spec.recursive,
            extensions=self._extensions,
            roots=self._roots,
            stop=stop,
        )
        feed = _Feed(found, stop, tally.walked, config.walk_ahead // config.batch_size)
        try:
            async with asyncio.TaskGroup() as lanes:
                for _ in range(config.lanes):
                    lanes.create_task(_lane(directory_scan, feed, tally, ctx))
        except ExceptionGroup as group:
            # The first lane's failure ends the job, as itself: a domain error keeps its
            # reason (a full disk, a lost database) instead of hiding in a group.
            raise group.exceptions[0] from group
        finally:
            feed.stop()
        return tally.result()


async def _lane(scan: DirectoryScan, feed: _Feed, tally: _Tally, ctx: JobContext) -> None:
    # The task cancel interrupts whatever a lane awaits; the token check between directories
    # is the safety net should a library swallow that cancel.
    while not ctx.cancelled and (listing := await feed.next()) is not None:
        if listing.error is not None:
            tally.note(listing.error.path, listing.error.message)
        await scan(listing)
