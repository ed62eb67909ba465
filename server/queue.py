"""The asyncio job queue: submit, cancel, watch, per-job timeout, a bounded set of workers.

Cancellation is a token with a reason *and* a task cancel: the token tells the job why it
stopped (and so which terminal state it ends in), the task cancel interrupts whatever the
handler awaits, so that a cancel never waits for a slow file.

Watchers read from a per-watcher slot: state changes queue up (a job has only a handful),
progress is coalesced so that the latest progress wins. A slow watcher therefore costs one
slot, never an unbounded buffer, and never holds up the job or the other watchers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ScanJobsError,
    Unavailable,
)
from server.jobs import (
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
    "JobContext",
    "JobHandler",
    "JobQueue",
    "QueueConfig",
    "Subscription",
]

log = logging.getLogger(__name__)

_OUTCOME = {
    CancelReason.USER: JobState.CANCELLED,
    CancelReason.TIMEOUT: JobState.TIMEOUT,
}


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
class QueueConfig:
    """Tunables of :class:`AsyncioJobQueue`.

    Attributes:
        workers: jobs running at once.
        job_timeout_s: run-time limit of a job whose request gives none.
        max_pending: PENDING jobs accepted before submit answers RESOURCE_EXHAUSTED.
        progress_interval_s: least time between two published progress events of one job.
        history: events kept per job for ``after_sequence`` replay.
    """

    workers: int = 2
    job_timeout_s: float = 3600.0
    max_pending: int = 1000
    progress_interval_s: float = 0.05
    history: int = 256


class Subscription:
    """One watcher of one job: an async iterator of events, ended by the terminal event.

    Use it as an async context manager, or call :meth:`close`, so that it is forgotten at once
    when the reader goes away.
    """

    def __init__(
        self,
        backlog: list[JobEvent],
        on_close: Callable[[Subscription], None],
        *,
        ended: bool = False,
    ) -> None:
        self._states: collections.deque[JobEvent] = collections.deque(backlog)
        self._progress: JobEvent | None = None
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._closed = False
        self._error: ScanJobsError | None = None
        self._finished = ended
        if backlog:
            self._wakeup.set()

    def push(self, event: JobEvent) -> None:
        """Queue a state change, or replace the pending progress with ``event``."""
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
    task: asyncio.Task[ScanResult] | None = None
    context: JobContext | None = None
    flush: asyncio.TimerHandle | None = None


class AsyncioJobQueue:
    """An in-process job queue running ``handler`` on ``config.workers`` asyncio workers.

    Jobs live in memory; the catalog a handler writes is its own business.
    """

    def __init__(
        self,
        handler: JobHandler,
        config: QueueConfig | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._handler = handler
        self._config = config or QueueConfig()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._order: list[_Entry] = []
        self._pending: asyncio.Queue[_Entry] = asyncio.Queue()
        self._pending_count = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers."""
        for n in range(self._config.workers):
            task = asyncio.create_task(self._worker(), name=f"job-worker-{n}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting jobs, stop running ones at their next safe point, end watchers.

        Jobs stopped by shutdown keep their non-terminal state. Idempotent.
        """
        self._closing = True
        for entry in self._order:
            if entry.task is not None and not entry.task.done():
                self._request_stop(entry, CancelReason.SHUTDOWN)
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            _, still = await asyncio.wait(workers, timeout=grace_s)
            for task in still:
                log.warning("worker did not stop within grace period: %s", task.get_name())
        for entry in self._order:
            for watcher in list(entry.watchers):
                watcher.fail(Unavailable("the server is shutting down; resume the watch"))

    @property
    def running_tasks(self) -> int:
        """Worker tasks still alive (0 after :meth:`close`)."""
        return len(self._workers)

    def watcher_count(self, job_id: str | None = None) -> int:
        """Open subscriptions, of one job or of all jobs."""
        if job_id is not None:
            return len(self._entry(job_id).watchers)
        return sum(len(e.watchers) for e in self._order)

    # -- the JobQueue protocol -------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        """Accept a job; it runs when a worker is free.

        Raises:
            Unavailable: the queue is closing.
            ResourceExhausted: ``max_pending`` jobs are already waiting.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._pending_count >= self._config.max_pending:
            raise ResourceExhausted(
                f"too many pending jobs (limit {self._config.max_pending})",
                reason="TOO_MANY_PENDING_JOBS",
            )
        timeout_s = spec.timeout_s or self._config.job_timeout_s
        job = Job(
            id=uuid.uuid4().hex,
            spec=spec,
            state=JobState.PENDING,
            create_time=self._clock(),
            timeout_s=timeout_s,
        )
        entry = _Entry(job=job, number=len(self._order))
        self._entries[job.id] = entry
        self._order.append(entry)
        self._publish(entry, state_change=True)
        self._pending_count += 1
        self._pending.put_nowait(entry)
        return job

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
        start = _decode_page_token(page_token, state) if page_token else len(self._order)
        jobs: list[Job] = []
        index = start
        while index > 0 and len(jobs) < page_size:
            index -= 1
            job = self._order[index].job
            if state is None or job.state is state:
                jobs.append(job)
        more = any(state is None or e.job.state is state for e in reversed(self._order[:index]))
        return jobs, _encode_page_token(index, state) if more else ""

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a PENDING one at once, a RUNNING one at its next safe point.

        Cancelling a CANCELLED job again returns it unchanged, so that retries are safe.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job already ended COMPLETED, FAILED or TIMEOUT.
        """
        entry = self._entry(job_id)
        job = entry.job
        if job.state is JobState.CANCELLED:
            return job  # a retried cancel gets the same answer
        if job.terminal:
            raise FailedPrecondition(
                f"job {job_id} already ended {job.state.value}", reason="JOB_ALREADY_ENDED"
            )
        if job.state is JobState.PENDING:
            self._pending_count -= 1
            self._set(entry, transition(job, JobState.CANCELLED, self._clock()), state_change=True)
        elif not job.cancel_requested:
            self._set(entry, replace(job, cancel_requested=True), state_change=True)
            self._request_stop(entry, CancelReason.USER)
        return entry.job

    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Subscribe to a job's events.

        The first event is the current snapshot, unless ``after_sequence`` names an event
        whose successors are still in the history: then those are replayed first.

        Raises:
            NotFound: no such job.
            InvalidArgument: ``after_sequence`` is beyond the job's latest event.
            Unavailable: the queue is closing.
        """
        entry = self._entry(job_id)
        if self._closing:
            raise Unavailable("the server is shutting down; resume the watch")
        self._flush(entry)
        if after_sequence > entry.sequence:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the job's latest event "
                f"{entry.sequence}",
                field="after_sequence",
            )
        backlog = self._backlog(entry, after_sequence)
        # A client that already saw the terminal event gets an empty stream that ends at once.
        ended = entry.job.terminal and not backlog
        subscription = Subscription(backlog, on_close=entry.watchers.discard, ended=ended)
        if not entry.job.terminal:
            entry.watchers.add(subscription)
        return subscription

    # -- internals -------------------------------------------------------------------------

    def _entry(self, job_id: str) -> _Entry:
        try:
            return self._entries[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND") from None

    def _backlog(self, entry: _Entry, after_sequence: int) -> list[JobEvent]:
        if after_sequence == entry.sequence:
            return []
        history = entry.history
        if after_sequence and history and history[0].sequence <= after_sequence + 1:
            return [e for e in history if e.sequence > after_sequence]
        return [history[-1]]

    def _set(self, entry: _Entry, job: Job, *, state_change: bool) -> None:
        entry.job = job
        if state_change:
            self._publish(entry, state_change=True)
        elif entry.flush is None:
            loop = asyncio.get_running_loop()
            entry.flush = loop.call_later(self._config.progress_interval_s, self._flush, entry)

    def _flush(self, entry: _Entry) -> None:
        if entry.published is not entry.job:
            self._publish(entry, state_change=False)

    def _publish(self, entry: _Entry, *, state_change: bool) -> None:
        if entry.flush is not None:
            entry.flush.cancel()
            entry.flush = None
        entry.sequence += 1
        entry.published = entry.job
        event = JobEvent(entry.sequence, entry.job, state_change)
        entry.history.append(event)
        if len(entry.history) > self._config.history:
            entry.history.popleft()
        for watcher in entry.watchers:
            watcher.push(event)
        if entry.job.terminal:
            entry.watchers.clear()

    def _request_stop(self, entry: _Entry, reason: CancelReason) -> None:
        ctx, task = entry.context, entry.task
        if ctx is None or task is None or task.done() or ctx.cancel_reason is not None:
            return
        ctx.cancel_reason = reason
        task.cancel()

    async def _worker(self) -> None:
        while True:
            entry = await self._pending.get()
            if entry.job.state is not JobState.PENDING:
                continue  # cancelled while it waited
            self._pending_count -= 1
            await self._run(entry)

    async def _run(self, entry: _Entry) -> None:
        ctx = JobContext(entry.job.id, lambda p, r: self._report(entry, p, r))
        entry.context = ctx
        self._set(entry, transition(entry.job, JobState.RUNNING, self._clock()), state_change=True)
        task = asyncio.create_task(self._handler(entry.job, ctx), name=f"job-{entry.job.id}")
        entry.task = task
        timer = asyncio.get_running_loop().call_later(
            entry.job.timeout_s, self._request_stop, entry, CancelReason.TIMEOUT
        )
        try:
            result = await _wait_owned(task)
        except asyncio.CancelledError:
            if ctx.cancel_reason is None or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            result = ctx.result
        except Exception as exc:  # a handler bug or an expected failure: the job fails
            self._finish(entry, JobState.FAILED, ctx.result, _failure_text(entry.job, exc))
            return
        finally:
            timer.cancel()
        self._conclude(entry, ctx, result)

    def _conclude(self, entry: _Entry, ctx: JobContext, result: ScanResult) -> None:
        reason = ctx.cancel_reason
        if reason is CancelReason.SHUTDOWN:
            return  # stays RUNNING: resumable by a later process
        state = _OUTCOME.get(reason, JobState.COMPLETED) if reason else JobState.COMPLETED
        error = f"job exceeded its timeout of {entry.job.timeout_s:g} s" if reason else ""
        if state is JobState.CANCELLED:
            error = ""
        self._finish(entry, state, result, error)

    def _finish(self, entry: _Entry, state: JobState, result: ScanResult, error: str) -> None:
        job = entry.job
        progress = job.progress
        if state is JobState.COMPLETED:
            progress = replace(progress, files_found=progress.files_done, current_path="")
        done = transition(job, state, self._clock(), result=result, error=error, progress=progress)
        self._set(entry, done, state_change=True)
        log.info("job %s ended %s", job.id, state.value, extra={"job_id": job.id})

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


async def _wait_owned(task: asyncio.Task[ScanResult]) -> ScanResult:
    """Await ``task``; if the waiter itself is cancelled, cancel ``task`` and wait for it."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise


def _failure_text(job: Job, exc: Exception) -> str:
    if isinstance(exc, ScanJobsError):
        return exc.message
    log.error("job %s handler crashed", job.id, exc_info=exc, extra={"job_id": job.id})
    return "internal error while scanning"


def _encode_page_token(index: int, state: JobState | None) -> str:
    raw = f"v1|{index}|{state.value if state else ''}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, state: JobState | None) -> int:
    bad = InvalidArgument(
        "page_token is malformed or belongs to another filter", field="page_token"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, index, state_name = raw.split("|")
        position = int(index)
    except ValueError:
        raise bad from None
    if version != "v1" or state_name != (state.value if state else "") or position < 0:
        raise bad
    return position
