"""The scan job: walk a directory, probe new or changed videos, and catalog them.

::

    walk (thread, by descriptor) -> bounded batches -> lanes, each: look up stamps in the catalog
    -> probe what changed (one worker round trip) -> commit the batch -> report progress

The walk streams: it never holds the tree in memory, only a few batches of candidates.
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

from .catalog import Catalog, Video
from .jobs import FileError, Job, Phase, Progress, ScanResult, display_path
from .probe import ProbeFailure, ProbeOutcome, Prober
from .roots import RootPolicy
from .runner import JobContext
from .walk import Candidate, WalkError, WalkItem, walk

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
    """Runs a walk in a thread and hands its items to the event loop in bounded batches."""

    def __init__(
        self,
        items: Iterator[WalkItem],
        stop: threading.Event,
        batch_size: int,
        on_arrival: Callable[[list[WalkItem] | None], None],
        walk_ahead: int,
    ) -> None:
        self._items = items
        self._on_arrival = on_arrival
        self._stop = stop
        self._batch_size = batch_size
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[WalkItem] | BaseException | None] = asyncio.Queue()
        self._slots = threading.Semaphore(max(2, walk_ahead // batch_size))
        self._thread = threading.Thread(target=self._produce, name="walk", daemon=True)
        self._thread.start()

    async def next(self) -> list[WalkItem] | None:
        """The next batch, or None once the walk ended (for every caller)."""
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
        batch: list[WalkItem] = []
        try:
            for item in self._items:
                batch.append(item)
                if len(batch) >= self._batch_size:
                    self._hand(batch)
                    batch = []
            if batch:
                self._hand(batch)
        except _Stopped:
            pass
        except Exception as exc:  # surfaced to the job on the loop
            self._deliver(exc)
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:  # a walk holds descriptors: release them in this thread
                close()
            self._deliver(None)

    def _hand(self, batch: list[WalkItem]) -> None:
        while not self._slots.acquire(timeout=0.05):
            if self._stop.is_set():
                raise _Stopped
        self._deliver(batch)

    def _deliver(self, item: list[WalkItem] | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: list[WalkItem] | BaseException | None) -> None:
        """On the loop: queue what the walk found and say so (found counts, end of walk)."""
        self._queue.put_nowait(item)
        if not isinstance(item, BaseException):
            self._on_arrival(item)


class _Stopped(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Tunables of a scan.

    Attributes:
        extensions: lower-case file extensions, with the dot, that mark a video.
        batch_size: files per catalog round trip (one look-up, one commit).
        probe_batch: files per round trip to a probe worker; a batch's chunks are probed
            in parallel.
        lanes: batches in flight at once.
        seen_resolution_ns: how stale an unchanged file's last-seen time may get before a
            rescan writes it again; a rescan within it writes nothing for unchanged files.
        max_errors: per-file errors kept per job; the rest are only counted.
        walk_ahead: files the walk may find before the probes catch up: enough to know the
            total of most libraries early (for a real ETA), while a huge tree still costs
            bounded memory.
    """

    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    batch_size: int = 128
    probe_batch: int = 16
    lanes: int = 2
    seen_resolution_ns: int = 3600 * 10**9
    max_errors: int = 50
    walk_ahead: int = 20_000


@dataclass(slots=True)
class _Tally:
    """Running counts of one job; every update is reported at once."""

    ctx: JobContext
    max_errors: int
    found: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    walking: bool = True
    current: str = ""
    errors: list[FileError] = field(default_factory=list)
    error_count: int = 0

    def walked(self, items: list[WalkItem] | None) -> None:
        """The walk found ``items``, or (None) ended."""
        if items is None:
            self.walking = False
        else:
            self.found += len(items)
        self.report()

    def fail(self, path: bytes, message: str) -> None:
        self.failed += 1
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(FileError(display_path(path), message))

    def result(self) -> ScanResult:
        return ScanResult(
            added=self.added,
            updated=self.updated,
            unchanged=self.unchanged,
            failed=self.failed,
            errors=tuple(self.errors),
            error_count=self.error_count,
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


@dataclass(slots=True)
class _Batch:
    """One batch on its way through a lane."""

    unchanged: int = 0
    stale: list[bytes] = field(default_factory=list)
    to_probe: list[Candidate] = field(default_factory=list)
    probed: list[Video] = field(default_factory=list)
    failures: list[tuple[bytes, str]] = field(default_factory=list)
    new: set[bytes] = field(default_factory=set)
    added: int = 0
    updated: int = 0


class Scanner:
    """The job handler of scan jobs.

    Args:
        roots: the allowed roots; the job's path is checked again when it starts.
        prober: probes changed files.
        catalog: where results go.
        config: tunables.
        clock_ns: wall clock in nanoseconds, for first/last-seen times.
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
        tally = _Tally(ctx, self._config.max_errors)
        tally.report()  # announces the DISCOVERING phase
        stop = threading.Event()
        items = walk(
            folder,
            recursive=job.spec.recursive,
            extensions=self._extensions,
            roots=self._roots,
            stop=stop,
        )
        feed = _Feed(items, stop, self._config.batch_size, tally.walked, self._config.walk_ahead)
        try:
            async with asyncio.TaskGroup() as lanes:
                for _ in range(self._config.lanes):
                    lanes.create_task(self._lane(job.id, feed, tally, ctx))
        except ExceptionGroup as group:
            # The first lane's failure ends the job, as itself: a domain error keeps its
            # reason (a full disk, a lost database) instead of hiding in a group.
            raise group.exceptions[0] from group
        finally:
            feed.stop()
        return tally.result()

    async def _lane(self, job_id: str, feed: _Feed, tally: _Tally, ctx: JobContext) -> None:
        # The task cancel interrupts whatever a lane awaits; the token check between batches
        # is the safety net should a library swallow that cancel.
        while not ctx.cancelled and (items := await feed.next()) is not None:
            batch = await self._prepare(items)
            await self._probe(batch)
            await self._commit(job_id, batch, tally, items[-1].path)

    async def _prepare(self, items: Sequence[WalkItem]) -> _Batch:
        batch = _Batch()
        candidates = [i for i in items if isinstance(i, Candidate)]
        batch.failures = [(i.path, i.message) for i in items if isinstance(i, WalkError)]
        known = await self._catalog.lookup([c.path for c in candidates])
        stale_before = self._clock_ns() - self._config.seen_resolution_ns
        for candidate in candidates:
            seen = known.get(candidate.path)
            if seen is None:
                batch.new.add(candidate.path)
                batch.to_probe.append(candidate)
            elif seen.stamp != candidate[1:3]:  # (size, mtime): tuples compare in C
                batch.to_probe.append(candidate)
            else:
                batch.unchanged += 1
                if seen.last_seen_ns < stale_before:
                    batch.stale.append(candidate.path)
        return batch

    async def _probe(self, batch: _Batch) -> None:
        todo, size = batch.to_probe, self._config.probe_batch
        if not todo:
            return
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        results = await asyncio.gather(
            *(self._prober.probe([c.target for c in chunk]) for chunk in chunks)
        )
        for chunk, outcomes in zip(chunks, results, strict=True):
            for candidate, outcome in zip(chunk, outcomes, strict=True):
                _sort_outcome(batch, candidate, outcome)

    async def _commit(self, job_id: str, batch: _Batch, tally: _Tally, last: bytes) -> None:
        write = asyncio.ensure_future(
            self._catalog.commit(job_id, batch.probed, batch.stale, self._clock_ns())
        )
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # A commit is short: let it land so that the report matches the catalog.
            await write
            _count(tally, batch, last)
            raise
        _count(tally, batch, last)


def _sort_outcome(batch: _Batch, candidate: Candidate, outcome: ProbeOutcome) -> None:
    if isinstance(outcome, ProbeFailure):
        batch.failures.append((candidate.path, outcome.message))
        return
    batch.probed.append(Video(candidate.path, candidate.stamp, outcome, 0, 0, ""))
    if candidate.path in batch.new:
        batch.added += 1
    else:
        batch.updated += 1


def _count(tally: _Tally, batch: _Batch, last: bytes) -> None:
    tally.added += batch.added
    tally.updated += batch.updated
    tally.unchanged += batch.unchanged
    for path, message in batch.failures:
        tally.fail(path, message)
    tally.current = display_path(last)
    tally.report()
