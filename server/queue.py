"""The job queues' shared contract, and the embedded queue: jobs in memory, events through an
outbox to a :class:`JobStore` (SQLite, or nothing).

Every queue runs its jobs with the one :class:`server.runner.JobRunner`; this module's
:class:`AsyncioJobQueue` is the runner's sink for a single server. Every change of a job
becomes an event with a per-job sequence. Events leave through one ordered outbox per job:
they are committed to the :class:`JobStore` first and announced to watchers and listeners
after, so a watcher never sees what a restart could forget.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from .errors import InvalidArgument, NotFound, ResourceExhausted, ShuttingDown, StorageFault
from .jobs import (
    TERMINAL,
    CancelReason,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    ScanResult,
    cancel_reply,
    finished,
    new_job,
    same_request,
)
from .jobstore import InMemoryJobStore, JobStore, StoredJob
from .runner import JobHandler, JobRunner, OwnedTasks
from .watch import ProgressPace, Subscription, check_watcher_limits

__all__ = [
    "AsyncioJobQueue",
    "InMemoryJobStore",
    "JobQueue",
    "JobStore",
    "QueueConfig",
    "StoredJob",
    "check_pending",
    "decode_page_token",
    "encode_page_token",
]

log = logging.getLogger(__name__)

_RETRY_S = 1.0  # between two attempts to commit events the store refused


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
class QueueConfig:
    """Tunables of a job queue; the one place their defaults are written.

    Attributes:
        workers: jobs running at once.
        job_timeout_s: run-time limit of a job whose request gives none.
        max_pending: PENDING jobs accepted before submit answers RESOURCE_EXHAUSTED.
        progress_interval_s: least time between two published progress events of one job.
        progress_budget_per_s: progress messages per second sent to all watchers together;
            with more watchers each is sent progress less often (see
            :class:`server.watch.ProgressPace`).
        history: recent events kept in memory per running job for ``after_sequence`` replay.
        max_attempts: starts a job gets (restarts included) before it fails for good.
        retention_s: ended jobs older than this are pruned, with their events.
        prune_interval_s: how often pruning runs.
        max_watchers: open subscriptions in total before watch answers RESOURCE_EXHAUSTED.
        max_watchers_per_job: open subscriptions of one job before the same.
        max_jobs: jobs kept in total; beyond it a submit drops the oldest ended jobs, and
            answers RESOURCE_EXHAUSTED when none has ended.
    """

    workers: int = 2
    job_timeout_s: float = 3600.0
    max_pending: int = 1000
    progress_interval_s: float = 0.1
    progress_budget_per_s: float = 1000.0
    history: int = 256
    max_attempts: int = 3
    retention_s: float = 7 * 24 * 3600.0
    prune_interval_s: float = 3600.0
    max_watchers: int = 4000
    max_watchers_per_job: int = 1000
    max_jobs: int = 10_000


def check_pending(pending: int, config: QueueConfig) -> None:
    """Admit one more PENDING job.

    Raises:
        ResourceExhausted: ``config.max_pending`` jobs are already waiting.
    """
    if pending >= config.max_pending:
        raise ResourceExhausted(
            f"too many pending jobs (limit {config.max_pending})",
            reason="TOO_MANY_PENDING_JOBS",
        )


def too_many_jobs(config: QueueConfig) -> ResourceExhausted:
    """The answer to a submit when ``max_jobs`` are kept and none of them has ended."""
    return ResourceExhausted(
        f"too many jobs kept and none has ended (limit {config.max_jobs})",
        reason="TOO_MANY_JOBS",
    )


@dataclass(slots=True, eq=False)
class _Entry:
    """Mutable bookkeeping of one job, private to the queue."""

    job: Job
    number: int
    sequence: int = 0
    history: collections.deque[JobEvent] = field(default_factory=collections.deque)
    watchers: set[Subscription] = field(default_factory=set)
    outbox: list[JobEvent] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    waiting_to_resume: bool = False


class AsyncioJobQueue:
    """A job queue of one server: ``handler`` runs on ``config.workers`` asyncio workers.

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
        self._config = config = config or QueueConfig()
        self._store: JobStore = store if store is not None else InMemoryJobStore()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._by_number: dict[int, _Entry] = {}
        self._numbers: dict[JobState | None, list[int]] = {s: [] for s in JobState}
        self._numbers[None] = []
        self._by_request: dict[str, _Entry] = {}
        self._pending: asyncio.Queue[_Entry] = asyncio.Queue()
        self._next_number = 0
        self._tasks = OwnedTasks()
        self._watching = 0
        self._pace = ProgressPace(config.progress_budget_per_s, config.progress_interval_s)
        self._closing = False
        self._runner = JobRunner(
            handler,
            self,
            workers=config.workers,
            max_attempts=config.max_attempts,
            progress_interval_s=config.progress_interval_s,
            clock=clock,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load kept jobs, queue the unfinished ones, start the workers and the pruner."""
        await self._prune()
        for stored in await self._store.load():
            self._adopt(stored)
        self._runner.start()
        self._tasks.spawn(self._prune_forever(), name="job-pruner")

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting jobs, stop running ones at their next safe point, end watchers.

        Jobs stopped by shutdown keep their non-terminal state and resume on the next start.
        Returns when every task of the queue has ended. Idempotent.
        """
        self._closing = True
        deadline = asyncio.get_running_loop().time() + grace_s
        await self._runner.close(grace_s)
        for task in self._tasks:  # the pruner; outboxes are left to commit
            if task.get_name() == "job-pruner":
                task.cancel()
        await self._tasks.stop(max(0.0, deadline - asyncio.get_running_loop().time()), "outboxes")
        for entry in self._entries.values():
            for watcher in list(entry.watchers):
                watcher.fail(ShuttingDown("the server is shutting down; resume the watch"))

    @property
    def running_tasks(self) -> int:
        """Tasks the queue still owns: workers, outboxes, the pruner (0 after :meth:`close`)."""
        return self._runner.running_tasks + len(self._tasks)

    def stats(self) -> tuple[dict[JobState, int], int, int]:
        """Jobs kept, by state; jobs waiting for a worker; open watch streams."""
        by_state = {s: len(self._numbers[s]) for s in JobState if self._numbers[s]}
        return by_state, len(self._numbers[JobState.PENDING]), self._watching

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
            ShuttingDown: the queue is closing.
            AlreadyExists: the ``request_id`` was used for a different request.
            ResourceExhausted: ``max_pending`` jobs are already waiting, or ``max_jobs`` are
                kept and none of them has ended.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if spec.request_id and (earlier := self._by_request.get(spec.request_id)):
            answer = same_request(earlier.job, spec)
            await self._committed(earlier)
            return answer
        check_pending(len(self._numbers[JobState.PENDING]), self._config)
        await self._make_room()
        entry = self._add(new_job(spec, self._clock(), self._config.job_timeout_s))
        try:
            await self._commit(entry, entry.job)
        except BaseException:
            self._forget(entry)
            raise
        self._pending.put_nowait(entry)
        return entry.job

    async def _make_room(self) -> None:
        """Drop the oldest ended jobs until one more fits under ``max_jobs``."""
        excess = len(self._entries) + 1 - self._config.max_jobs
        if excess <= 0:
            return
        gone: list[_Entry] = []
        for number in heapq.merge(*(self._numbers[s] for s in TERMINAL)):
            entry = self._by_number[number]
            if entry.drain is None or entry.drain.done():  # its end is committed
                gone.append(entry)
            if len(gone) == excess:
                break
        else:
            raise too_many_jobs(self._config)
        await self._store.delete([e.job.id for e in gone])
        for entry in gone:
            self._forget(entry)

    async def get(self, job_id: str) -> Job:
        """Return a job's current snapshot.

        Raises:
            NotFound: no such job.
        """
        entry = self._entry(job_id)
        return self._runner.current(job_id) or entry.job

    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """Return up to ``page_size`` jobs, newest first, and the token of the next page.

        Reads an index per state: a page costs its size, not the number of jobs kept.

        Raises:
            InvalidArgument: ``page_token`` is not one this method returned for this filter.
        """
        numbers = self._numbers[state]
        bound = decode_page_token(page_token, state) if page_token else self._next_number
        end = bisect.bisect_left(numbers, bound)
        begin = max(0, end - page_size)
        jobs = [self._by_number[n].job for n in reversed(numbers[begin:end])]
        return jobs, encode_page_token(numbers[begin], state) if begin > 0 else ""

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a PENDING one at once, a RUNNING one at its next safe point.

        Cancelling a CANCELLED job again returns it unchanged, so that retries are safe. The
        reply shows the job as it was when the cancel was accepted.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job already ended COMPLETED, FAILED or TIMEOUT.
        """
        entry = self._entry(job_id)
        job = self._runner.current(job_id) or entry.job
        answer = cancel_reply(job, self._clock(), idle=entry.waiting_to_resume)
        if answer is job:
            return job
        await self._commit(entry, answer)
        self._runner.request_stop(job_id, CancelReason.USER)
        return answer

    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Subscribe to a job's events.

        The first event is the current snapshot, unless ``after_sequence`` names an event
        whose successors are still kept: then those are replayed first.

        Raises:
            NotFound: no such job.
            InvalidArgument: ``after_sequence`` is beyond the job's latest event.
            ResourceExhausted: too many watchers, in total or of this job.
            ShuttingDown: the queue is closing.
        """
        entry = self._entry(job_id)
        if self._closing:
            raise ShuttingDown("the server is shutting down; resume the watch")
        check_watcher_limits(
            of_job=len(entry.watchers),
            total=self._watching,
            max_watchers_per_job=self._config.max_watchers_per_job,
            max_watchers=self._config.max_watchers,
        )
        if after_sequence > entry.sequence:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the job's latest event "
                f"{entry.sequence}",
                field="after_sequence",
            )
        await self._runner.flush(job_id)
        with contextlib.suppress(StorageFault):  # not kept yet: the rest follows once it is
            await self._committed(entry)  # so that the snapshot is the current state
        subscription = Subscription(lambda s: self._unwatch(entry, s), self._pace)
        try:
            await self._seed(entry, subscription, after_sequence)
        except BaseException:
            subscription.close()
            raise
        return subscription

    async def _seed(self, entry: _Entry, subscription: Subscription, after: int) -> None:
        last = entry.history[-1]
        if not last.job.terminal:
            entry.watchers.add(subscription)
            self._watching += 1
        if after == 0:
            subscription.seed([last])
        elif after >= last.sequence:
            subscription.seed([], ended=last.job.terminal)
        elif entry.history[0].sequence <= after + 1:
            subscription.seed([e for e in entry.history if e.sequence > after])
        else:
            replay = await self._store.events_after(entry.job.id, after)
            subscription.seed(replay or [entry.history[-1]])

    def _unwatch(self, entry: _Entry, subscription: Subscription) -> None:
        if subscription in entry.watchers:
            entry.watchers.discard(subscription)
            self._watching -= 1

    # -- the runner's sink -----------------------------------------------------------------

    async def claim(self, start: Callable[[Job], Job]) -> Job | None:
        """The next job waiting for a worker, started (or ended) by ``start`` and committed."""
        entry = await self._pending.get()
        if entry.job.state not in (JobState.PENDING, JobState.RUNNING):
            return None  # cancelled while it waited
        entry.waiting_to_resume = False
        try:
            await self._commit(entry, start(entry.job))
        except StorageFault as exc:  # kept once the store recovers, with the failure after it
            failed = finished(entry.job, JobState.FAILED, ScanResult(), exc.message, self._clock())
            self._set(entry, failed, state_change=True)
            return None
        return entry.job  # with a cancel that arrived during the commit

    async def publish(self, job: Job, *, state_change: bool) -> Job:
        """Commit a change of a running job, keeping a cancel request that crossed it."""
        entry = self._entries[job.id]
        if entry.job.cancel_requested and not job.cancel_requested:
            job, state_change = replace(job, cancel_requested=True), True
        self._set(entry, job, state_change=state_change)
        with contextlib.suppress(StorageFault):  # queued: committed once the store recovers
            await self._committed(entry)
        return job

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
        self._by_number[entry.number] = entry
        self._numbers[None].append(entry.number)
        self._numbers[job.state].append(entry.number)
        if job.spec.request_id:
            self._by_request[job.spec.request_id] = entry
        return entry

    def _forget(self, entry: _Entry) -> None:
        if self._entries.pop(entry.job.id, None) is None:
            return
        del self._by_number[entry.number]
        for numbers in (self._numbers[None], self._numbers[entry.job.state]):
            del numbers[bisect.bisect_left(numbers, entry.number)]
        if self._by_request.get(entry.job.spec.request_id) is entry:
            del self._by_request[entry.job.spec.request_id]

    def _adopt(self, stored: StoredJob) -> None:
        """Take over a job loaded from the store; queue it if it was unfinished."""
        job = stored.job
        entry = self._add(job)
        entry.sequence = stored.last_event.sequence
        entry.history.append(replace(stored.last_event, job=job))
        entry.waiting_to_resume = job.state is JobState.RUNNING
        if not job.terminal:
            self._pending.put_nowait(entry)

    # -- publishing ------------------------------------------------------------------------

    def _set(self, entry: _Entry, job: Job, *, state_change: bool) -> None:
        """Make ``job`` the entry's snapshot and put its event in the outbox."""
        if job.state is not entry.job.state:
            old = self._numbers[entry.job.state]
            del old[bisect.bisect_left(old, entry.number)]
            bisect.insort(self._numbers[job.state], entry.number)
        entry.job = job
        entry.sequence += 1
        entry.outbox.append(JobEvent(entry.sequence, job, state_change, self._clock()))
        if entry.drain is None or entry.drain.done():
            entry.drain = self._tasks.spawn(self._drain(entry), name=f"outbox-{job.id}")
            entry.drain.add_done_callback(_observed)

    async def _commit(self, entry: _Entry, job: Job) -> None:
        self._set(entry, job, state_change=True)
        await self._committed(entry)

    async def _committed(self, entry: _Entry) -> None:
        """Wait until everything published for ``entry`` so far is committed."""
        if entry.drain is not None:
            # Shielded: a caller that goes away must not cancel the commit of others' events.
            await asyncio.shield(entry.drain)

    async def _drain(self, entry: _Entry) -> None:
        """Commit the outbox in order, then announce what was committed. An ended job's
        progress events are thinned before its end is announced.

        When the store cannot take them (a full disk, say) the events stay queued and are
        tried again every ``_RETRY_S``, so that no change is lost once it can be kept; whoever
        waits for this commit gets the error now."""
        while entry.outbox:
            batch, entry.outbox = entry.outbox, []
            try:
                await self._store.append(batch)
            except StorageFault as exc:
                entry.outbox[:0] = batch
                log.warning("job %s: events not kept yet: %s", entry.job.id, exc.message)
                if not self._closing:
                    asyncio.get_running_loop().call_later(_RETRY_S, self._redrain, entry)
                raise
            if batch[-1].job.terminal:
                with contextlib.suppress(StorageFault):  # thinning is only a saving
                    await self._store.thin(entry.job.id)
            for event in batch:
                self._announce(entry, event)

    def _redrain(self, entry: _Entry) -> None:
        """Try a failed commit again, unless the job was forgotten (a refused submit)."""
        if self._closing or self._entries.get(entry.job.id) is not entry or not entry.outbox:
            return
        if entry.drain is None or entry.drain.done():
            entry.drain = self._tasks.spawn(self._drain(entry), name=f"outbox-{entry.job.id}")
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


def _observed(task: asyncio.Task[Any]) -> None:
    """Mark a commit's failure as seen: the waiters (if any) got it, and it was logged."""
    if not task.cancelled() and not isinstance(task.exception(), StorageFault | None):
        log.error("committing events failed", exc_info=task.exception())


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
