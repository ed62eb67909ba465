"""The asyncio job queue: submit, cancel, watch, per-job timeout, a bounded set of workers.

Cancellation is a token with a reason *and* a task cancel: the token tells the job why it
stopped (and so which terminal state it ends in), the task cancel interrupts whatever the
handler awaits, so that a cancel never waits for a slow file.

Every change of a job becomes an event with a per-job sequence. Events leave through one
ordered outbox per job: they are committed to the :class:`JobStore` first and announced to
watchers after, so a watcher never sees what a restart could forget.

Watchers read from a per-watcher slot: state changes queue up (a job has only a handful),
progress is coalesced so that the latest progress wins. A slow watcher therefore costs one
slot, never an unbounded buffer, and never holds up the job or the other watchers.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import itertools
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self

from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ScanJobsError,
    StorageFault,
    Unavailable,
)
from .jobs import (
    CancelReason,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    Progress,
    ScanResult,
    transition,
)

__all__ = [
    "AsyncioJobQueue",
    "InMemoryJobStore",
    "JobContext",
    "JobHandler",
    "JobQueue",
    "JobStore",
    "QueueConfig",
    "StoredJob",
    "Subscription",
]

log = logging.getLogger(__name__)

_RETRY_S = 1.0  # between two attempts to commit events the store refused
_OUTCOME = {CancelReason.USER: JobState.CANCELLED, CancelReason.TIMEOUT: JobState.TIMEOUT}


class JobContext:
    """What a running handler gets: why it should stop, and where to report progress."""

    def __init__(self, job_id: str, report: Callable[[Progress | None, ScanResult | None], None]):
        self.job_id = job_id
        self.cancel_reason: CancelReason | None = None
        self._report = report
        self.result = ScanResult()

    @property
    def cancelled(self) -> bool:
        """True once the job was asked to stop, for whatever reason."""
        return self.cancel_reason is not None

    def report(self, progress: Progress | None = None, result: ScanResult | None = None) -> None:
        """Publish new progress and/or result; report only work that is already committed."""
        if result is not None:
            self.result = result
        self._report(progress, result)


JobHandler = Callable[[Job, JobContext], Coroutine[Any, Any, ScanResult]]
"""Runs one job and returns its result. It is cancelled (``asyncio.CancelledError``) when the
job is cancelled, times out or the server shuts down; it cleans up and re-raises, and the job
keeps the last result it reported."""


class JobQueue(Protocol):
    """What the transport needs from a job queue."""

    async def submit(self, spec: JobSpec) -> Job: ...
    async def get(self, job_id: str) -> Job: ...
    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]: ...
    async def cancel(self, job_id: str) -> Job: ...
    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription: ...


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as a store gives it back at start-up, with its latest stored event."""

    job: Job
    last_event: JobEvent


class JobStore(Protocol):
    """Where jobs and their events are kept across restarts."""

    async def load(self) -> list[StoredJob]:
        """Every kept job, in submission order."""
        ...

    async def append(self, events: Sequence[JobEvent]) -> None:
        """Commit events, and each job's snapshot as of its latest event, atomically."""
        ...

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        """Kept events of a job with a greater sequence, in order."""
        ...

    async def thin(self, job_id: str) -> None:
        """Drop an ended job's progress events, keeping its state changes."""
        ...

    async def prune(self, ended_before: datetime) -> list[str]:
        """Delete jobs that ended before ``ended_before``, and their events; return their ids."""
        ...


class InMemoryJobStore:
    """A :class:`JobStore` that forgets everything with the process: the test double."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}

    async def load(self) -> list[StoredJob]:
        return [StoredJob(job, self._events[job_id][-1]) for job_id, job in self._jobs.items()]

    async def append(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            self._jobs[event.job.id] = event.job
            self._events.setdefault(event.job.id, []).append(event)

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        return [e for e in self._events.get(job_id, []) if e.sequence > after_sequence]

    async def thin(self, job_id: str) -> None:
        events = self._events[job_id]
        self._events[job_id] = [e for e in events if e.state_change]

    async def prune(self, ended_before: datetime) -> list[str]:
        gone = [
            i for i, j in self._jobs.items() if j.end_time is not None and j.end_time < ended_before
        ]
        for job_id in gone:
            del self._jobs[job_id], self._events[job_id]
        return gone


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Tunables of :class:`AsyncioJobQueue`.

    Attributes:
        workers: jobs running at once.
        job_timeout_s: run-time limit of a job whose request gives none.
        max_pending: PENDING jobs accepted before submit answers RESOURCE_EXHAUSTED.
        progress_interval_s: least time between two published progress events of one job.
        history: recent events kept in memory per running job for ``after_sequence`` replay.
        max_attempts: starts a job gets (restarts included) before it fails for good.
        retention_s: ended jobs older than this are pruned, with their events.
        prune_interval_s: how often pruning runs.
        max_watchers: open subscriptions in total before watch answers RESOURCE_EXHAUSTED.
        max_watchers_per_job: open subscriptions of one job before the same.
    """

    workers: int = 2
    job_timeout_s: float = 3600.0
    max_pending: int = 1000
    progress_interval_s: float = 0.1
    history: int = 256
    max_attempts: int = 3
    retention_s: float = 7 * 24 * 3600.0
    prune_interval_s: float = 3600.0
    max_watchers: int = 4000
    max_watchers_per_job: int = 1000


class Subscription:
    """One watcher of one job: an async iterator of events, ended by the terminal event.

    Use it as an async context manager, or call :meth:`close`, so that it is forgotten at once
    when the reader goes away.
    """

    def __init__(self, on_close: Callable[[Subscription], None]) -> None:
        self._states: collections.deque[JobEvent] = collections.deque()
        self._progress: JobEvent | None = None
        self._last = 0
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._closed = False
        self._error: ScanJobsError | None = None
        self._finished = False

    def seed(self, backlog: Sequence[JobEvent], *, ended: bool = False) -> None:
        """Put ``backlog`` first, merged with whatever was pushed meanwhile."""
        merged = {e.sequence: e for e in backlog}
        for event in [*self._states, *([self._progress] if self._progress else [])]:
            merged.setdefault(event.sequence, event)
        self._states = collections.deque(merged[k] for k in sorted(merged))
        self._progress = None
        self._last = max(self._last, *merged) if merged else self._last
        self._finished = ended and not merged
        self._wakeup.set()

    def push(self, event: JobEvent) -> None:
        """Queue a state change, or replace the pending progress with ``event``."""
        if event.sequence <= self._last:
            return  # already queued (a replay raced with the live stream)
        self._last = event.sequence
        if event.state_change:
            self._progress = None
            self._states.append(event)
        else:
            self._progress = event
        self._wakeup.set()

    def fail(self, error: ScanJobsError) -> None:
        """End the stream with ``error`` after what is queued (e.g. on shutdown)."""
        self._error = error
        self._wakeup.set()

    def close(self) -> None:
        """Stop watching; idempotent."""
        if not self._closed:
            self._closed = True
            self._on_close(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JobEvent:
        while not self._finished:
            event = self._take()
            if event is not None:
                self._finished = event.job.terminal
                return event
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        self.close()
        raise StopAsyncIteration

    def _take(self) -> JobEvent | None:
        if self._states:
            return self._states.popleft()
        event, self._progress = self._progress, None
        return event

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(slots=True, eq=False)
class _Entry:
    """Mutable bookkeeping of one job, private to the queue."""

    job: Job
    number: int
    sequence: int = 0
    published: Job | None = None
    history: collections.deque[JobEvent] = field(default_factory=collections.deque)
    watchers: set[Subscription] = field(default_factory=set)
    outbox: list[JobEvent] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    task: asyncio.Task[ScanResult] | None = None
    context: JobContext | None = None
    flush: asyncio.TimerHandle | None = None


class AsyncioJobQueue:
    """A job queue running ``handler`` on ``config.workers`` asyncio workers.

    Args:
        handler: runs one job.
        config: tunables.
        store: where jobs and events are kept; in memory only unless given.
        clock: wall clock for job times.
        listeners: called with every committed event (metrics, for example); they must not
            block.
    """

    def __init__(
        self,
        handler: JobHandler,
        config: QueueConfig | None = None,
        *,
        store: JobStore | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        listeners: Sequence[Callable[[JobEvent], None]] = (),
    ) -> None:
        self._listeners = tuple(listeners)
        self._handler = handler
        self._config = config or QueueConfig()
        self._store: JobStore = store if store is not None else InMemoryJobStore()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._order: list[_Entry] = []
        self._by_request: dict[str, _Entry] = {}
        self._pending: asyncio.Queue[_Entry] = asyncio.Queue()
        self._pending_count = 0
        self._next_number = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._watching = 0
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load kept jobs, resume the unfinished ones, start the workers and the pruner."""
        await self._prune()
        for stored in await self._store.load():
            self._adopt(stored)
        for n in range(self._config.workers):
            task = asyncio.create_task(self._worker(), name=f"job-worker-{n}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        self._spawn(self._prune_forever(), name="job-pruner")

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting jobs, stop running ones at their next safe point, end watchers.

        Jobs stopped by shutdown keep their non-terminal state and resume on the next start.
        Idempotent.
        """
        self._closing = True
        for entry in self._order:
            self._request_stop(entry, CancelReason.SHUTDOWN)
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            _, still = await asyncio.wait(workers, timeout=grace_s)
            for task in still:
                log.warning("worker did not stop within grace period: %s", task.get_name())
        await self._settle(grace_s)
        for entry in self._order:
            for watcher in list(entry.watchers):
                watcher.fail(Unavailable("the server is shutting down; resume the watch"))

    async def _settle(self, grace_s: float) -> None:
        """Let outboxes commit, then cancel what else is left (the pruner). Progress not yet
        published is dropped: a timer firing later would write to a closed store."""
        for entry in self._order:
            if entry.flush is not None:
                entry.flush.cancel()
                entry.flush = None
        drains = [e.drain for e in self._order if e.drain is not None and not e.drain.done()]
        if drains:
            await asyncio.wait(drains, timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)

    @property
    def running_tasks(self) -> int:
        """Tasks the queue still owns: workers, outboxes, the pruner (0 after :meth:`close`)."""
        return len(self._workers) + len(self._tasks)

    def stats(self) -> tuple[dict[JobState, int], int, int]:
        """Jobs kept, by state; jobs waiting for a worker; open watch streams."""
        by_state: dict[JobState, int] = {}
        for entry in self._order:
            by_state[entry.job.state] = by_state.get(entry.job.state, 0) + 1
        return by_state, self._pending_count, self._watching

    def watcher_count(self, job_id: str | None = None) -> int:
        """Open subscriptions, of one job or of all jobs."""
        if job_id is not None:
            return len(self._entry(job_id).watchers)
        return self._watching

    # -- the JobQueue protocol -------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        """Accept a job; it runs when a worker is free. Returns once the job is committed.

        A ``request_id`` seen before (and still kept) returns the job it created.

        Raises:
            Unavailable: the queue is closing.
            AlreadyExists: the ``request_id`` was used for a different request.
            ResourceExhausted: ``max_pending`` jobs are already waiting.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if spec.request_id and (earlier := self._by_request.get(spec.request_id)):
            return await self._retried(earlier, spec)
        if self._pending_count >= self._config.max_pending:
            raise ResourceExhausted(
                f"too many pending jobs (limit {self._config.max_pending})",
                reason="TOO_MANY_PENDING_JOBS",
            )
        job = Job(
            id=uuid.uuid4().hex,
            spec=spec,
            state=JobState.PENDING,
            create_time=self._clock(),
            timeout_s=spec.timeout_s or self._config.job_timeout_s,
        )
        entry = self._add(job)
        self._pending_count += 1
        try:
            await self._set_committed(entry, job)
        except BaseException:
            self._forget(entry)
            self._pending_count -= 1
            raise
        self._pending.put_nowait(entry)
        return job

    async def _retried(self, earlier: _Entry, spec: JobSpec) -> Job:
        if earlier.job.spec != spec:
            raise AlreadyExists(
                f"request_id {spec.request_id!r} was already used for a different request",
                reason="REQUEST_ID_REUSED",
            )
        if earlier.drain is not None:
            await asyncio.shield(earlier.drain)
        return earlier.job

    async def get(self, job_id: str) -> Job:
        """Return a job's current snapshot.

        Raises:
            NotFound: no such job.
        """
        return self._entry(job_id).job

    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """Return up to ``page_size`` jobs, newest first, and the token of the next page.

        Raises:
            InvalidArgument: ``page_token`` is not one this method returned for this filter.
        """
        bound = decode_page_token(page_token, state) if page_token else self._next_number
        index = bisect.bisect_left(self._order, bound, key=lambda e: e.number)
        jobs: list[Job] = []
        while index > 0 and len(jobs) < page_size:
            index -= 1
            job = self._order[index].job
            if state is None or job.state is state:
                jobs.append(job)
        earlier = itertools.islice(self._order, index)  # no copy of the whole list per page
        more = any(state is None or e.job.state is state for e in earlier)
        token = encode_page_token(self._order[index].number, state) if more else ""
        return jobs, token

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a PENDING one at once, a RUNNING one at its next safe point.

        Cancelling a CANCELLED job again returns it unchanged, so that retries are safe. The
        reply shows the job as it was when the cancel was accepted.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job already ended COMPLETED, FAILED or TIMEOUT.
        """
        entry = self._entry(job_id)
        job = entry.job
        if job.state is JobState.CANCELLED or job.cancel_requested:
            return job  # a retried cancel gets the same answer
        if job.terminal:
            raise FailedPrecondition(
                f"job {job_id} already ended {job.state.value}", reason="JOB_ALREADY_ENDED"
            )
        if job.state is JobState.PENDING:
            self._pending_count -= 1
            answer = transition(job, JobState.CANCELLED, self._clock())
        elif entry.task is None:  # RUNNING before a restart and waiting to resume
            answer = transition(job, JobState.CANCELLED, self._clock(), cancel_requested=True)
        else:
            answer = replace(job, cancel_requested=True)
            self._set(entry, answer, state_change=True)
            self._request_stop(entry, CancelReason.USER)
            await self._committed(entry)
            return answer
        await self._set_committed(entry, answer)
        return answer

    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Subscribe to a job's events.

        The first event is the current snapshot, unless ``after_sequence`` names an event
        whose successors are still kept: then those are replayed first.

        Raises:
            NotFound: no such job.
            InvalidArgument: ``after_sequence`` is beyond the job's latest event.
            ResourceExhausted: too many watchers, in total or of this job.
            Unavailable: the queue is closing.
        """
        entry = self._entry(job_id)
        if self._closing:
            raise Unavailable("the server is shutting down; resume the watch")
        self._check_watcher_limits(entry)
        if after_sequence > entry.sequence:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the job's latest event "
                f"{entry.sequence}",
                field="after_sequence",
            )
        self._flush(entry)
        with contextlib.suppress(StorageFault):  # not kept yet: the rest follows once it is
            await self._committed(entry)  # so that the snapshot is the current state
        last = entry.history[-1]
        subscription = Subscription(on_close=lambda s: self._unwatch(entry, s))
        if not last.job.terminal:
            entry.watchers.add(subscription)
            self._watching += 1
        if after_sequence == 0:
            subscription.seed([last])
        elif after_sequence >= last.sequence:
            subscription.seed([], ended=last.job.terminal)
        elif entry.history[0].sequence <= after_sequence + 1:
            subscription.seed([e for e in entry.history if e.sequence > after_sequence])
        else:
            replay = await self._store.events_after(job_id, after_sequence)
            subscription.seed(replay or [entry.history[-1]])
        return subscription

    def _unwatch(self, entry: _Entry, subscription: Subscription) -> None:
        if subscription in entry.watchers:
            entry.watchers.discard(subscription)
            self._watching -= 1

    def _check_watcher_limits(self, entry: _Entry) -> None:
        config = self._config
        if len(entry.watchers) >= config.max_watchers_per_job:
            raise ResourceExhausted(
                f"too many watchers of this job (limit {config.max_watchers_per_job})",
                reason="TOO_MANY_WATCHERS",
            )
        if self._watching >= config.max_watchers:
            raise ResourceExhausted(
                f"too many watchers (limit {config.max_watchers})", reason="TOO_MANY_WATCHERS"
            )

    # -- bookkeeping -----------------------------------------------------------------------

    def _entry(self, job_id: str) -> _Entry:
        try:
            return self._entries[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND") from None

    def _add(self, job: Job) -> _Entry:
        entry = _Entry(job=job, number=self._next_number)
        self._next_number += 1
        self._entries[job.id] = entry
        self._order.append(entry)
        if job.spec.request_id:
            self._by_request[job.spec.request_id] = entry
        return entry

    def _forget(self, entry: _Entry) -> None:
        self._entries.pop(entry.job.id, None)
        with contextlib.suppress(ValueError):
            self._order.remove(entry)
        if self._by_request.get(entry.job.spec.request_id) is entry:
            del self._by_request[entry.job.spec.request_id]

    def _adopt(self, stored: StoredJob) -> None:
        """Take over a job loaded from the store; resume it if it was unfinished."""
        job = stored.job
        entry = self._add(job)
        entry.sequence = stored.last_event.sequence
        entry.published = job
        entry.history.append(replace(stored.last_event, job=job))
        if job.state is JobState.PENDING:
            self._pending_count += 1
            self._pending.put_nowait(entry)
        elif job.state is JobState.RUNNING:
            self._resume(entry)

    def _resume(self, entry: _Entry) -> None:
        job, now = entry.job, self._clock()
        if job.cancel_requested:
            self._set(entry, transition(job, JobState.CANCELLED, now), state_change=True)
        elif job.attempts >= self._config.max_attempts:
            error = (
                f"the job was interrupted {job.attempts} times (server restarts); "
                "giving up. Submit it again to retry."
            )
            self._set(entry, transition(job, JobState.FAILED, now, error=error), state_change=True)
        else:
            log.info("resuming job %s", job.id, extra={"job_id": job.id})
            self._pending.put_nowait(entry)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- publishing ------------------------------------------------------------------------

    def _set(self, entry: _Entry, job: Job, *, state_change: bool) -> None:
        entry.job = job
        if state_change:
            self._publish(entry, state_change=True)
        elif entry.flush is None and not self._closing:
            loop = asyncio.get_running_loop()
            entry.flush = loop.call_later(self._config.progress_interval_s, self._flush, entry)

    async def _set_committed(self, entry: _Entry, job: Job) -> None:
        self._set(entry, job, state_change=True)
        await self._committed(entry)

    async def _committed(self, entry: _Entry) -> None:
        """Wait until everything published for ``entry`` so far is committed."""
        if entry.drain is not None:
            # Shielded: a caller that goes away must not cancel the commit of others' events.
            await asyncio.shield(entry.drain)

    def _flush(self, entry: _Entry) -> None:
        if entry.published is not entry.job:
            self._publish(entry, state_change=False)
        elif entry.flush is not None:
            entry.flush.cancel()
            entry.flush = None

    def _publish(self, entry: _Entry, *, state_change: bool) -> None:
        if entry.flush is not None:
            entry.flush.cancel()
            entry.flush = None
        entry.sequence += 1
        entry.published = entry.job
        entry.outbox.append(JobEvent(entry.sequence, entry.job, state_change, self._clock()))
        if entry.drain is None or entry.drain.done():
            entry.drain = self._spawn(self._drain(entry), name=f"outbox-{entry.job.id}")
            entry.drain.add_done_callback(_observed)

    async def _drain(self, entry: _Entry) -> None:
        """Commit the outbox in order, then announce what was committed.

        When the store cannot take them (a full disk, say) the events stay queued and are
        tried again every ``_RETRY_S``, so that no change is lost once it can be kept; whoever
        waits for this commit gets the error now."""
        while entry.outbox:
            batch, entry.outbox = entry.outbox, []
            try:
                await self._store.append(batch)
            except StorageFault as exc:
                entry.outbox[:0] = batch
                log.warning("job %s: events not kept yet: %s", entry.job.id, exc.message,
                            extra={"job_id": entry.job.id})  # fmt: skip
                if not self._closing:
                    asyncio.get_running_loop().call_later(_RETRY_S, self._redrain, entry)
                raise
            for event in batch:
                self._announce(entry, event)

    def _redrain(self, entry: _Entry) -> None:
        """Try a failed commit again, unless the job was forgotten (a refused submit)."""
        if self._closing or self._entries.get(entry.job.id) is not entry or not entry.outbox:
            return
        if entry.drain is None or entry.drain.done():
            entry.drain = self._spawn(self._drain(entry), name=f"outbox-{entry.job.id}")
            entry.drain.add_done_callback(_observed)

    def _announce(self, entry: _Entry, event: JobEvent) -> None:
        entry.history.append(event)
        if len(entry.history) > self._config.history:
            entry.history.popleft()
        for watcher in entry.watchers:
            watcher.push(event)
        for listener in self._listeners:
            listener(event)
        if event.job.terminal:
            self._watching -= len(entry.watchers)
            entry.watchers.clear()
            entry.history = collections.deque([event])  # replays now come from the store
            self._spawn(self._store.thin(event.job.id), name=f"thin-{event.job.id}")

    # -- running ---------------------------------------------------------------------------

    def _request_stop(self, entry: _Entry, reason: CancelReason) -> None:
        ctx, task = entry.context, entry.task
        if ctx is None or task is None or task.done() or ctx.cancel_reason is not None:
            return
        ctx.cancel_reason = reason
        task.cancel()

    async def _worker(self) -> None:
        while True:
            entry = await self._pending.get()
            if entry.job.state is JobState.PENDING:
                self._pending_count -= 1
            elif entry.job.state is not JobState.RUNNING:
                continue  # cancelled while it waited
            try:
                await self._run(entry)
            except Exception:  # the store failed: keep serving the other jobs
                log.exception("job %s could not run", entry.job.id, extra={"job_id": entry.job.id})

    async def _run(self, entry: _Entry) -> None:
        ctx = JobContext(entry.job.id, lambda p, r: self._report(entry, p, r))
        entry.context = ctx
        job = entry.job
        if job.state is JobState.PENDING:
            started = transition(job, JobState.RUNNING, self._clock(), attempts=1)
        else:  # resumed after a restart: from the start of the walk, nothing counted yet
            started = replace(
                job, attempts=job.attempts + 1, progress=Progress(), result=ScanResult()
            )
        try:
            await self._set_committed(entry, started)
        except StorageFault as exc:  # kept once the store recovers, with the failure after it
            self._finish(entry, JobState.FAILED, ScanResult(), exc.message)
            return
        task = asyncio.create_task(self._handler(started, ctx), name=f"job-{job.id}")
        entry.task = task
        timer = asyncio.get_running_loop().call_later(
            started.timeout_s, self._request_stop, entry, CancelReason.TIMEOUT
        )
        try:
            result = await wait_owned(task)
        except asyncio.CancelledError:
            if ctx.cancel_reason is None or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            result = ctx.result
        except Exception as exc:  # a handler bug or an expected failure: the job fails
            self._finish(entry, JobState.FAILED, ctx.result, failure_text(entry.job, exc))
            return
        finally:
            timer.cancel()
        self._conclude(entry, ctx, result)

    def _conclude(self, entry: _Entry, ctx: JobContext, result: ScanResult) -> None:
        done = ending(entry.job, ctx.cancel_reason, result, self._clock())
        if done is not None:  # None: stopped by shutdown, stays RUNNING for the next start
            self._set(entry, done, state_change=True)

    def _finish(self, entry: _Entry, state: JobState, result: ScanResult, error: str) -> None:
        done = finished(entry.job, state, result, error, self._clock())
        self._set(entry, done, state_change=True)

    def _report(self, entry: _Entry, progress: Progress | None, result: ScanResult | None) -> None:
        job = entry.job
        if job.terminal:
            return
        changed = replace(
            job,
            progress=progress if progress is not None else job.progress,
            result=result if result is not None else job.result,
        )
        self._set(entry, changed, state_change=False)

    # -- retention -------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.prune_interval_s)
            try:
                await self._prune()
            except StorageFault as exc:  # a full disk must not end pruning for good
                log.warning("pruning ended jobs failed: %s", exc.message)

    async def _prune(self) -> None:
        cutoff = self._clock() - timedelta(seconds=self._config.retention_s)
        for job_id in await self._store.prune(cutoff):
            if (entry := self._entries.get(job_id)) is not None:
                self._forget(entry)


def ending(job: Job, reason: CancelReason | None, result: ScanResult, now: datetime) -> Job | None:
    """How a job whose handler returned (or was cancelled for ``reason``) ends; None when a
    shutdown stopped it, so that it stays RUNNING and resumes."""
    if reason is CancelReason.SHUTDOWN:
        return None
    state = _OUTCOME[reason] if reason else JobState.COMPLETED
    error = (
        f"job exceeded its timeout of {job.timeout_s:g} s" if reason is CancelReason.TIMEOUT else ""
    )
    return finished(job, state, result, error, now)


def finished(job: Job, state: JobState, result: ScanResult, error: str, now: datetime) -> Job:
    """``job`` moved to the terminal ``state`` with its final result."""
    progress = job.progress
    if state is JobState.COMPLETED:
        progress = replace(progress, files_found=progress.files_done, current_path="")
    log.info("job %s ended %s", job.id, state.value, extra={"job_id": job.id})
    return transition(job, state, now, result=result, error=error, progress=progress)


def _observed(task: asyncio.Task[Any]) -> None:
    """Mark a commit's failure as seen: the waiters (if any) got it, and it was logged."""
    if not task.cancelled() and not isinstance(task.exception(), StorageFault | None):
        log.error("committing events failed", exc_info=task.exception())


async def wait_owned(task: asyncio.Task[ScanResult]) -> ScanResult:
    """Await ``task``; if the waiter itself is cancelled, cancel ``task`` and wait for it."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise


def failure_text(job: Job, exc: Exception) -> str:
    """The error a failed job shows: an expected error's message, or a bare internal error
    (the traceback goes to the log)."""
    if isinstance(exc, ScanJobsError):
        return exc.message
    log.error("job %s handler crashed", job.id, exc_info=exc, extra={"job_id": job.id})
    return "internal error while scanning"


def encode_page_token(number: int, state: JobState | None) -> str:
    """Opaque ListJobs token: resume below job ``number``, for this filter only."""
    raw = f"v1|{number}|{state.value if state else ''}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, state: JobState | None) -> int:
    """Inverse of :func:`encode_page_token`.

    Raises:
        InvalidArgument: malformed, or made for another filter.
    """
    bad = InvalidArgument(
        "page_token is malformed or belongs to another filter", field="page_token"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, number, state_name = raw.split("|")
        position = int(number)
    except ValueError:
        raise bad from None
    if version != "v1" or state_name != (state.value if state else "") or position < 0:
        raise bad
    return position
