"""One job runner for every queue: workers, the run of a job, stop requests, progress, close.

A queue keeps jobs somewhere (in memory with an outbox to SQLite, or as PostgreSQL rows with
leases); the runner does everything else of a job's life, the same way over each of them,
through a small :class:`JobSink` the queue implements:

- ``claim`` hands a worker the next job to run, after applying the pure start-or-resume
  decision of :func:`server.jobs.start_or_resume` and committing its result;
- ``publish`` commits one change of a job the runner runs, and tells whether a cancel was
  requested meanwhile or the job was lost to another replica.

Cancellation is a token with a reason *and* a task cancel: the token tells the job why it
stopped (and so which terminal state it ends in, see :func:`server.jobs.ending`), the task
cancel interrupts whatever the handler awaits, so that a cancel never waits for a slow file.
Progress is coalesced: at most one progress write per job per ``progress_interval_s``, and
never one after the job's end. How often each watcher is then sent it is the watchers' own
pace (:class:`server.watch.ProgressPace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from .errors import DatabaseUnavailable
from .jobs import (
    CancelReason,
    Job,
    JobState,
    Progress,
    ScanResult,
    ending,
    failure_text,
    finished,
    start_or_resume,
)
from .logs import bound_job

__all__ = ["JobContext", "JobHandler", "JobRunner", "JobSink", "OwnedTasks", "wait_owned"]

log = logging.getLogger(__name__)

HARD_STOP_S = 5.0
"""Seconds that tasks still running after the grace period get between their cancel and a
logged complaint (the wait goes on: a close never leaves a task of its own behind)."""


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


class JobSink(Protocol):
    """What a queue gives the runner: where jobs come from and where their changes go."""

    async def claim(self, start: Callable[[Job], Job]) -> Job | None:
        """Wait for a job to run, apply ``start`` to it and commit the outcome.

        Returns the committed job (RUNNING, or terminal when ``start`` ended it), or None when
        there was nothing to take this time (the worker asks again).
        """
        ...

    async def publish(self, job: Job, *, state_change: bool) -> Job | None:
        """Commit a change of a job this runner runs; returns once it is committed.

        Returns the job as committed (carrying a cancel request that crossed this write), or
        None when the job is no longer this runner's (another replica took it over).
        """
        ...


class OwnedTasks:
    """A registry of tasks: each is kept until it ends, and :meth:`stop` never leaves one."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Any:
        return iter(list(self._tasks))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by this registry."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, grace_s: float, what: str) -> None:
        """Two-stage stop: wait up to ``grace_s`` for the tasks to end, then cancel the rest,
        log their names, and wait for them (complaining every :data:`HARD_STOP_S`)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        left = list(self._tasks)
        if not left:
            return
        log.warning(
            "cancelled at close: %s still running after the grace period", what,
            extra={"tasks": sorted(t.get_name() for t in left)},
        )  # fmt: skip
        await cancel_and_wait(left)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, however long that takes."""
    left = {t for t in tasks if not t.done()}
    while left:
        for task in left:
            task.cancel()
        _, left = await asyncio.wait(left, timeout=HARD_STOP_S)
        if left:
            log.error(
                "tasks ignore their cancel", extra={"tasks": sorted(t.get_name() for t in left)}
            )


@dataclass(slots=True, eq=False)
class _Run:
    """A job this runner runs."""

    job: Job
    published: Job
    context: JobContext | None = None
    task: asyncio.Task[ScanResult] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    progress_timer: asyncio.TimerHandle | None = None
    lost: bool = False


class JobRunner:
    """Runs claimed jobs on ``workers`` asyncio workers over ``sink``.

    Args:
        handler: runs one job.
        sink: the queue's claim and publish.
        workers: jobs running at once.
        max_attempts: starts a job gets (restarts included) before it fails for good.
        progress_interval_s: least time between two progress writes of one job.
        clock: wall clock for job times.
    """

    def __init__(
        self,
        handler: JobHandler,
        sink: JobSink,
        *,
        workers: int,
        max_attempts: int,
        progress_interval_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._handler = handler
        self._sink = sink
        self._workers = workers
        self._max_attempts = max_attempts
        self._interval_s = progress_interval_s
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._idle: set[asyncio.Task[Any]] = set()
        self._worker_tasks = OwnedTasks()
        self._tasks = OwnedTasks()
        self._closing = False

    def start(self) -> None:
        """Start the workers."""
        for n in range(self._workers):
            self._worker_tasks.spawn(self._work(), name=f"job-worker-{n}")

    @property
    def running_tasks(self) -> int:
        """Workers and writes in flight (0 after :meth:`close`)."""
        return len(self._worker_tasks) + len(self._tasks)

    def current(self, job_id: str) -> Job | None:
        """The latest snapshot of a job running here, published or not; None if not here."""
        run = self._runs.get(job_id)
        return run.job if run is not None else None

    def running_ids(self) -> list[str]:
        """Ids of the jobs running here."""
        return list(self._runs)

    def request_stop(self, job_id: str, reason: CancelReason) -> None:
        """Ask a job running here to stop for ``reason``; nothing if it does not run here."""
        run = self._runs.get(job_id)
        if run is None:
            return
        if reason is CancelReason.USER and not run.job.cancel_requested:
            run.job = replace(run.job, cancel_requested=True)
        _stop(run, reason)

    async def flush(self, job_id: str) -> None:
        """Publish a running job's unpublished progress now (a watcher wants a current
        snapshot)."""
        run = self._runs.get(job_id)
        if run is not None and run.published is not run.job:
            await self._publish(run, run.job, state_change=False)

    async def close(self, grace_s: float) -> None:
        """Stop: idle workers at once; running jobs at their next safe point (they stay
        RUNNING and resume on the next start); after ``grace_s`` whatever is left is
        cancelled (and logged). Returns only when every task of the runner has ended."""
        self._closing = True
        for run in self._runs.values():
            if run.progress_timer is not None:
                run.progress_timer.cancel()
                run.progress_timer = None
            _stop(run, CancelReason.SHUTDOWN)
        for task in self._idle:
            task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self._worker_tasks.stop(grace_s, "job workers")
        await self._tasks.stop(max(0.0, deadline - loop.time()), "job writes")

    # -- workers ---------------------------------------------------------------------------

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None  # noqa: S101
        while not self._closing:
            self._idle.add(me)
            try:
                job = await self._sink.claim(self._start)
            except Exception:  # the store failed: keep serving the other jobs
                log.exception("claiming a job failed")
                continue
            finally:
                self._idle.discard(me)
            if job is None or job.terminal:
                continue
            with bound_job(job.id):
                try:
                    await self._run(job)
                except Exception:
                    log.exception("job could not run")

    def _start(self, job: Job) -> Job:
        with bound_job(job.id):
            return start_or_resume(job, self._clock(), self._max_attempts)

    async def _run(self, job: Job) -> None:
        run = _Run(job, published=job)
        self._runs[job.id] = run
        try:
            done = await self._execute(run)
            if done is not None:
                await self._end(run, done)
        finally:
            if run.progress_timer is not None:
                run.progress_timer.cancel()
            self._runs.pop(job.id, None)

    async def _execute(self, run: _Run) -> Job | None:
        """Run the handler under the job's timeout; the job as it ends (None: it stays
        RUNNING, stopped by a shutdown or lost to another replica)."""
        ctx = run.context = JobContext(run.job.id, partial(self._report, run))
        run.task = asyncio.create_task(self._handler(run.job, ctx), name=f"job-{run.job.id}")
        if run.job.cancel_requested:  # requested between the claim and now
            _stop(run, CancelReason.USER)
        elif self._closing:  # claimed as the close began
            _stop(run, CancelReason.SHUTDOWN)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(run.job.timeout_s, _stop, run, CancelReason.TIMEOUT)
        try:
            result = await wait_owned(run.task)
        except asyncio.CancelledError:
            if ctx.cancel_reason is None or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            result = ctx.result
        except DatabaseUnavailable:
            raise  # not the job's fault: it stays RUNNING, and resumes once its lease lapses
        except Exception as exc:  # a handler bug or an expected failure: the job fails
            error = failure_text(exc)
            return finished(run.job, JobState.FAILED, ctx.result, error, self._clock())
        finally:
            timer.cancel()
        return ending(run.job, ctx.cancel_reason, result, self._clock())

    async def _end(self, run: _Run, done: Job) -> None:
        """Publish the end; a shutdown arriving meanwhile does not interrupt the write."""
        run.job = done
        write = self._tasks.spawn(self._publish(run, done, state_change=True), f"end-{done.id}")
        await asyncio.shield(write)

    # -- publishing ------------------------------------------------------------------------

    def _report(self, run: _Run, progress: Progress | None, result: ScanResult | None) -> None:
        job = run.job
        if job.terminal:
            return
        run.job = replace(
            job,
            progress=progress if progress is not None else job.progress,
            result=result if result is not None else job.result,
        )
        if run.progress_timer is None and not self._closing:
            loop = asyncio.get_running_loop()
            run.progress_timer = loop.call_later(self._interval_s, self._progress_due, run)

    def _progress_due(self, run: _Run) -> None:
        run.progress_timer = None
        if run.published is not run.job and not run.job.terminal and not self._closing:
            self._tasks.spawn(self._publish_progress(run), f"progress-{run.job.id}")

    async def _publish_progress(self, run: _Run) -> None:
        try:
            await self._publish(run, run.job, state_change=False)
        except Exception:  # the store failed: the next progress, or the end, tries again
            log.exception("publishing progress failed")

    async def _publish(self, run: _Run, job: Job, *, state_change: bool) -> None:
        """Commit a change of ``run``, in order with its other changes, never after its end."""
        async with run.lock:
            if run.lost or run.published.terminal:
                return
            # A progress write that starts after the end was decided carries the end: it is
            # then the state change, or the end's thinning of progress would delete it.
            kept = await self._sink.publish(job, state_change=state_change or job.terminal)
            run.published = job
            if kept is None:
                log.warning("lost job %s to another replica", job.id)
                run.lost = True
                _stop(run, CancelReason.SHUTDOWN)
            elif kept.cancel_requested and not run.job.cancel_requested:
                run.job = replace(run.job, cancel_requested=True)
                _stop(run, CancelReason.USER)


def _stop(run: _Run, reason: CancelReason) -> None:
    ctx, task = run.context, run.task
    if ctx is None or task is None or task.done() or ctx.cancel_reason is not None:
        return
    ctx.cancel_reason = reason
    task.cancel()


async def wait_owned(task: asyncio.Task[ScanResult]) -> ScanResult:
    """Await ``task``; if the waiter itself is cancelled, cancel ``task`` and wait for it."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
