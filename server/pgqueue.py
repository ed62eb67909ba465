"""The job queue for several servers sharing one PostgreSQL: any replica accepts any call.

- **Claiming.** Workers take pending jobs with ``SELECT … FOR UPDATE SKIP LOCKED``, so a job
  runs on exactly one replica; the owner holds a lease (``lease_until``) and renews it.
  A job whose lease lapsed (its replica was killed or cut off) is claimed like a pending one
  and resumed from the start of its walk (catalogued files count as unchanged).
- **Events are rows.** Every change is a ``job_events`` row committed with the job's row;
  ``NOTIFY`` only wakes readers, the table is the truth. Any replica serves ``WatchJob`` and
  replays from ``after_sequence``.
- **Cancel from anywhere.** ``CancelJob`` is a committed row update plus a ``NOTIFY`` that
  reaches the owner at once; the owner's lease renewal reads the flag too, should a
  notification be lost.

No coordination of our own making: PostgreSQL's row locks, leases and notifications do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .errors import (
    AlreadyExists,
    DatabaseUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
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
from .pgstore import PgDatabase
from .queue import (
    JobContext,
    JobHandler,
    QueueConfig,
    Subscription,
    decode_page_token,
    encode_page_token,
    ending,
    failure_text,
    finished,
    wait_owned,
)
from .store import decode_job, encode_job, event_from_row, time_ns

__all__ = ["ClusterConfig", "PgJobQueue"]

log = logging.getLogger(__name__)

_CHANNEL = "scanjobs"
# Serialises submits, so that the pending limit and request ids hold across replicas.
_SUBMIT_LOCK = 0x5CA4_0B6
_Conn = psycopg.AsyncConnection[Any]
# What a lost database looks like: the pool's translation, or psycopg from a direct connection.
_DATABASE_DOWN = (psycopg.Error, DatabaseUnavailable)
_EVENT_COLUMNS = "SELECT sequence, state_change, snapshot, time_ns FROM job_events"
_LATEST_EVENT = _EVENT_COLUMNS + " WHERE job_id = %s ORDER BY sequence DESC LIMIT 1"
_EVENTS_AFTER = _EVENT_COLUMNS + " WHERE job_id = %s AND sequence > %s ORDER BY sequence"
_UPDATE_JOB = (
    "UPDATE jobs SET seq = seq + 1, state = %s, snapshot = %s, end_ns = %s WHERE id = %s"
    " RETURNING seq, cancel_requested"
)
_UPDATE_OWNED_JOB = _UPDATE_JOB.replace(" RETURNING", " AND owner = %s RETURNING")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How replicas share work.

    Attributes:
        replica: this replica's name, stored as the owner of the jobs it runs.
        lease_s: how long a claim holds without renewal; another replica takes the job over
            after that.
        poll_s: the safety net under notifications: idle workers look for jobs, watchers for
            events, owners for cancels, at least this often.
    """

    replica: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    lease_s: float = 15.0
    poll_s: float = 1.0


@dataclass(slots=True, eq=False)
class _Running:
    """A job this replica runs."""

    job: Job
    context: JobContext
    task: asyncio.Task[ScanResult] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    published: Job | None = None
    flush: asyncio.TimerHandle | None = None
    lost: bool = False


class PgJobQueue:
    """A :class:`server.queue.JobQueue` whose state lives in PostgreSQL."""

    def __init__(
        self,
        handler: JobHandler,
        db: PgDatabase,
        config: QueueConfig | None = None,
        cluster: ClusterConfig | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        listeners: Sequence[Callable[[JobEvent], None]] = (),
    ) -> None:
        self._handler = handler
        self._db = db
        self._config = config or QueueConfig()
        self._cluster = cluster or ClusterConfig()
        self._clock = clock
        self._listeners = tuple(listeners)
        self._running: dict[str, _Running] = {}
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._work = asyncio.Event()
        self._subscriptions: set[Subscription] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._listener: _Conn | None = None
        self._counts: dict[JobState, int] = {}
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for notifications, start the workers, the lease keeper and the pruner."""
        self._listener = await psycopg.AsyncConnection.connect(self._db.url, autocommit=True)
        await self._listener.execute(f"LISTEN {_CHANNEL}")
        self._spawn(self._listen(self._listener), "pg-listen")
        for n in range(self._config.workers):
            task = asyncio.create_task(self._worker(), name=f"job-worker-{n}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        self._spawn(self._keep_leases(), "pg-leases")
        await self._tidy()
        self._spawn(self._housekeeping(), "pg-housekeeping")

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop claiming, stop local jobs at a safe point and hand them back at once (their
        leases are released, so another replica resumes them), end watchers; idempotent."""
        if self._closing:
            return
        self._closing = True
        for running in list(self._running.values()):
            _request_stop(running, CancelReason.SHUTDOWN)
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers, timeout=grace_s)
        with contextlib.suppress(*_DATABASE_DOWN):
            async with self._db.pool.connection() as conn:
                await conn.execute(
                    "UPDATE jobs SET owner = NULL, lease_until = now()"
                    " WHERE owner = %s AND state = 'RUNNING'",
                    (self._cluster.replica,),
                )
                await conn.execute("SELECT pg_notify(%s, 'p:')", (_CHANNEL,))
        for subscription in list(self._subscriptions):
            subscription.fail(Unavailable("the server is shutting down; resume the watch"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        if self._listener is not None:
            await self._listener.close()

    @property
    def running_tasks(self) -> int:
        """Tasks the queue still owns (0 after :meth:`close`)."""
        return len(self._workers) + len(self._tasks)

    def watcher_count(self, job_id: str | None = None) -> int:
        """Open subscriptions on this replica (of one job, or of all)."""
        if job_id is None:
            return len(self._subscriptions)
        return len(self._wakeups.get(job_id, ()))

    def stats(self) -> tuple[dict[JobState, int], int, int]:
        """Jobs by state (as of the last housekeeping), pending jobs, open watch streams."""
        return dict(self._counts), self._counts.get(JobState.PENDING, 0), len(self._subscriptions)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the JobQueue protocol -------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        """Accept a job on any replica; a pending-job limit and request ids hold cluster-wide.

        Raises:
            Unavailable, AlreadyExists, ResourceExhausted: as for the in-process queue.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        async with self._db.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SUBMIT_LOCK,))
            if spec.request_id:
                earlier = await _one(conn, "SELECT snapshot FROM jobs WHERE request_id = %s",
                                     (spec.request_id,))  # fmt: skip
                if earlier is not None:
                    return _same_request(decode_job(earlier[0]), spec)
            pending = await _one(conn, "SELECT count(*) FROM jobs WHERE state = 'PENDING'", ())
            if pending is not None and pending[0] >= self._config.max_pending:
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
            await conn.execute(
                "INSERT INTO jobs (id, state, request_id, snapshot, seq)"
                " VALUES (%s, %s, %s, %s, 0)",
                (job.id, job.state.value, spec.request_id, encode_job(job)),
            )
            await self._append(conn, job, state_change=True)
            await conn.execute("SELECT pg_notify(%s, 'p:')", (_CHANNEL,))
        return job

    async def get(self, job_id: str) -> Job:
        """One job's snapshot, from any replica.

        Raises:
            NotFound: no such job.
        """
        async with self._db.pool.connection() as conn:
            row = await _one(conn, "SELECT snapshot FROM jobs WHERE id = %s", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        return decode_job(row[0])

    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """Jobs newest first (submission order across replicas)."""
        bound = decode_page_token(page_token, state) if page_token else 2**62
        async with self._db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT number, snapshot FROM jobs WHERE number < %s AND (%s::text IS NULL"
                " OR state = %s) ORDER BY number DESC LIMIT %s",
                (bound, state.value if state else None, state.value if state else None,
                 page_size + 1),
            )  # fmt: skip
            rows = await cursor.fetchall()
        jobs = [decode_job(r[1]) for r in rows[:page_size]]
        more = len(rows) > page_size
        return jobs, encode_page_token(rows[page_size - 1][0], state) if more else ""

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job from any replica: a committed row update, then a notification.

        Raises:
            NotFound, FailedPrecondition: as for the in-process queue.
        """
        async with self._db.pool.connection() as conn, conn.transaction():
            row = await _one(conn, "SELECT snapshot FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            if row is None:
                raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
            job = decode_job(row[0])
            if job.state is JobState.CANCELLED or job.cancel_requested:
                return job
            if job.terminal:
                raise FailedPrecondition(
                    f"job {job_id} already ended {job.state.value}", reason="JOB_ALREADY_ENDED"
                )
            if job.state is JobState.PENDING:
                answer = transition(job, JobState.CANCELLED, self._clock())
            else:
                answer = replace(job, cancel_requested=True)
            await conn.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s", (job_id,))
            await self._append(conn, answer, state_change=True)
            await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, f"c:{job_id}"))
        return answer

    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Follow a job from any replica: the table is read, notifications only wake us.

        Raises:
            NotFound, InvalidArgument, ResourceExhausted, Unavailable.
        """
        if self._closing:
            raise Unavailable("the server is shutting down; resume the watch")
        async with self._db.pool.connection() as conn:
            row = await _one(conn, "SELECT seq FROM jobs WHERE id = %s", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        if after_sequence > row[0]:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the job's latest event {row[0]}",
                field="after_sequence",
            )
        running = self._running.get(job_id)
        if running is not None and running.published is not running.job:
            await self._write(running, running.job, state_change=False)  # a current snapshot
        if len(self._subscriptions) >= self._config.max_watchers:
            raise ResourceExhausted("too many watchers", reason="TOO_MANY_WATCHERS")
        wake = asyncio.Event()
        subscription = Subscription(on_close=lambda s: self._unwatch(job_id, s, wake, feeding))
        self._subscriptions.add(subscription)
        self._wakeups.setdefault(job_id, set()).add(wake)
        feeding = self._spawn(self._feed(job_id, after_sequence, subscription, wake), "watch")
        return subscription

    # -- watching --------------------------------------------------------------------------

    def _unwatch(
        self,
        job_id: str,
        subscription: Subscription,
        wake: asyncio.Event,
        feeding: asyncio.Task[Any],
    ) -> None:
        self._subscriptions.discard(subscription)
        wakeups = self._wakeups.get(job_id)
        if wakeups is not None:
            wakeups.discard(wake)
            if not wakeups:
                del self._wakeups[job_id]
        feeding.cancel()

    async def _feed(
        self, job_id: str, after: int, subscription: Subscription, wake: asyncio.Event
    ) -> None:
        """Copy a job's events from the table into ``subscription`` until the terminal one."""
        try:
            last = after
            if after == 0:
                latest = await self._events(job_id, 0, latest_only=True)
                subscription.seed(latest)
                if not latest or latest[-1].job.terminal:
                    return
                last = latest[-1].sequence
            while True:
                wake.clear()
                events = await self._events(job_id, last)
                for event in events:
                    subscription.push(event)
                    last = event.sequence
                    if event.job.terminal:
                        return
                # A caller that resumes after the terminal event gets an empty, ended stream.
                if after and not events and last == after and (await self.get(job_id)).terminal:
                    subscription.seed([], ended=True)
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._cluster.poll_s):
                        await wake.wait()
        except _DATABASE_DOWN:
            log.exception("watch of job %s failed", job_id, extra={"job_id": job_id})
            subscription.fail(
                DatabaseUnavailable("the database cannot be reached; resume the watch shortly")
            )

    async def _events(
        self, job_id: str, after: int, *, latest_only: bool = False
    ) -> list[JobEvent]:
        """Events after ``after`` in order, or only the latest one."""
        async with self._db.pool.connection() as conn:
            if latest_only:
                cursor = await conn.execute(_LATEST_EVENT, (job_id,))
            else:
                cursor = await conn.execute(_EVENTS_AFTER, (job_id, after))
            rows = await cursor.fetchall()
        return [event_from_row(tuple(r)) for r in rows]

    async def _listen(self, conn: _Conn) -> None:
        """Dispatch notifications; when the database was lost, listen again once it is back
        and wake everyone, for what was notified meanwhile."""
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                async for note in conn.notifies():
                    self._dispatch(note.payload)
            await conn.close()
            conn = self._listener = await self._listen_again()
            self._work.set()
            for wakeups in self._wakeups.values():
                for wake in wakeups:
                    wake.set()

    async def _listen_again(self) -> _Conn:
        """A new listening connection, once the database takes one."""
        while True:
            await asyncio.sleep(self._cluster.poll_s)
            try:
                conn = await psycopg.AsyncConnection.connect(self._db.url, autocommit=True)
            except psycopg.OperationalError:
                continue
            try:
                await conn.execute(f"LISTEN {_CHANNEL}")
            except psycopg.OperationalError:
                await conn.close()
                continue
            return conn

    def _dispatch(self, payload: str) -> None:
        """One notification: new work, events to wake watchers, cancels for owners."""
        kind, _, job_id = payload.partition(":")
        if kind == "p":
            self._work.set()
        elif kind == "e":
            for wake in self._wakeups.get(job_id, ()):
                wake.set()
        elif kind == "c" and (running := self._running.get(job_id)) is not None:
            running.job = replace(running.job, cancel_requested=True)
            _request_stop(running, CancelReason.USER)

    # -- writing events ----------------------------------------------------------------------

    async def _append(
        self, conn: _Conn, job: Job, *, state_change: bool, owner: str | None = None
    ) -> Job | None:
        """Write ``job`` and its event in the caller's transaction; None if ``owner`` no
        longer holds the job (its lease was taken over).

        The ``cancel_requested`` column is written only by CancelJob, so an owner's write
        that crossed a cancel keeps the flag: the job returned carries it."""
        values = (job.state.value, encode_job(job), time_ns(job.end_time), job.id)
        if owner is None:
            cursor = await conn.execute(_UPDATE_JOB, values)
        else:
            cursor = await conn.execute(_UPDATE_OWNED_JOB, (*values, owner))
        row = await cursor.fetchone()
        if row is None:
            return None
        sequence, cancel_requested = row
        if cancel_requested and not job.cancel_requested:
            job = replace(job, cancel_requested=True)
            state_change = True
            await conn.execute(
                "UPDATE jobs SET snapshot = %s WHERE id = %s", (encode_job(job), job.id)
            )
        event = JobEvent(sequence, job, state_change, self._clock())
        await conn.execute(
            "INSERT INTO job_events VALUES (%s, %s, %s, %s, %s)",
            (job.id, event.sequence, state_change, encode_job(job), time_ns(event.time)),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, f"e:{job.id}"))
        for listener in self._listeners:
            listener(event)
        return job

    async def _write(self, running: _Running, job: Job, *, state_change: bool) -> None:
        """Publish a change of a job this replica owns, in order with its other changes."""
        async with running.lock:
            ended = running.published is not None and running.published.terminal
            if running.lost or ended:  # a late progress write must not follow the end
                return
            async with self._db.pool.connection() as conn, conn.transaction():
                kept = await self._append(
                    conn, job, state_change=state_change, owner=self._cluster.replica
                )
            running.published = job
            if kept is None:
                log.warning("lost job %s to another replica", job.id, extra={"job_id": job.id})
                running.lost = True
                _request_stop(running, CancelReason.SHUTDOWN)
            elif kept.cancel_requested and not running.job.cancel_requested:
                running.job = replace(running.job, cancel_requested=True)
                _request_stop(running, CancelReason.USER)

    # -- claiming and running ------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            try:
                claimed = await self._claim()
            except _DATABASE_DOWN:
                log.exception("claiming a job failed")
                claimed = None
            if claimed is None:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._cluster.poll_s):
                        await self._work.wait()
                continue
            try:
                await self._run(claimed)
            except _DATABASE_DOWN:
                log.exception("job %s lost its database", claimed.id, extra={"job_id": claimed.id})

    async def _claim(self) -> Job | None:
        """Take the oldest pending job, or one whose owner's lease lapsed; None if none."""
        async with self._db.pool.connection() as conn, conn.transaction():
            # Never a job this replica still runs, even if its lease lapsed while the event
            # loop was stalled: the handler in flight would race its own successor.
            row = await _one(
                conn,
                "SELECT snapshot FROM jobs WHERE (state = 'PENDING'"
                " OR (state = 'RUNNING' AND (lease_until IS NULL OR lease_until < now())))"
                " AND id <> ALL(%s) ORDER BY number FOR UPDATE SKIP LOCKED LIMIT 1",
                (list(self._running),),
            )
            if row is None:
                return None
            job = decode_job(row[0])
            started = self._start_or_end(job)
            await conn.execute(
                "UPDATE jobs SET owner = %s, lease_until = now() + %s WHERE id = %s",
                (self._cluster.replica, timedelta(seconds=self._cluster.lease_s), job.id),
            )
            await self._append(conn, started, state_change=True)
        if started.terminal:
            return None
        if job.state is JobState.RUNNING:
            log.info("resuming job %s", job.id, extra={"job_id": job.id})
        return started

    def _start_or_end(self, job: Job) -> Job:
        now = self._clock()
        if job.state is JobState.PENDING:
            return transition(job, JobState.RUNNING, now, attempts=1)
        if job.cancel_requested:
            return transition(job, JobState.CANCELLED, now)
        if job.attempts >= self._config.max_attempts:
            error = (
                f"the job was interrupted {job.attempts} times (server restarts); giving up."
                " Submit it again to retry."
            )
            return transition(job, JobState.FAILED, now, error=error)
        return replace(job, attempts=job.attempts + 1, progress=Progress(), result=ScanResult())

    async def _run(self, job: Job) -> None:
        running = _Running(job, JobContext(job.id, lambda p, r: self._report(running, p, r)))
        running.published = job
        self._running[job.id] = running
        running.task = asyncio.create_task(
            self._handler(job, running.context), name=f"job-{job.id}"
        )
        timer = asyncio.get_running_loop().call_later(
            job.timeout_s, _request_stop, running, CancelReason.TIMEOUT
        )
        try:
            try:
                result = await wait_owned(running.task)
            except asyncio.CancelledError:
                ctx = running.context
                if ctx.cancel_reason is None or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
                result = ctx.result
            except DatabaseUnavailable:
                raise  # not the job's fault: its lease lapses and it resumes (worker logs it)
            except Exception as exc:  # a handler bug or an expected failure: the job fails
                error = failure_text(running.job, exc)
                done = finished(running.job, JobState.FAILED, running.context.result, error,
                                self._clock())  # fmt: skip
                await self._end(running, done)
                return
            done_or_none = ending(running.job, running.context.cancel_reason, result, self._clock())
            if done_or_none is not None:
                await self._end(running, done_or_none)
        finally:
            timer.cancel()
            if running.flush is not None:
                running.flush.cancel()
            self._running.pop(job.id, None)

    async def _end(self, running: _Running, done: Job) -> None:
        running.job = done
        await asyncio.shield(self._write(running, done, state_change=True))

    def _report(
        self, running: _Running, progress: Progress | None, result: ScanResult | None
    ) -> None:
        job = running.job
        running.job = replace(
            job,
            progress=progress if progress is not None else job.progress,
            result=result if result is not None else job.result,
        )
        if running.flush is None:
            running.flush = asyncio.get_running_loop().call_later(
                self._config.progress_interval_s, self._flush, running
            )

    def _flush(self, running: _Running) -> None:
        running.flush = None
        if running.published is not running.job and not running.job.terminal:
            self._spawn(self._write(running, running.job, state_change=False), "progress")

    async def _keep_leases(self) -> None:
        """Renew the leases of local jobs; learn of cancels whose notification was lost."""
        interval = min(self._cluster.lease_s / 3, self._cluster.poll_s)
        while True:
            await asyncio.sleep(interval)
            if not self._running:
                continue
            try:
                await self._renew()
            except _DATABASE_DOWN:
                log.exception("renewing leases failed")

    async def _renew(self) -> None:
        ids = list(self._running)
        async with self._db.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET lease_until = now() + %s WHERE id = ANY(%s) AND owner = %s"
                " RETURNING id, cancel_requested",
                (timedelta(seconds=self._cluster.lease_s), ids, self._cluster.replica),
            )
            rows = await cursor.fetchall()
        kept: dict[str, bool] = {r[0]: r[1] for r in rows}
        for job_id in ids:
            running = self._running.get(job_id)
            if running is None:
                continue
            if job_id not in kept:
                running.lost = True
                _request_stop(running, CancelReason.SHUTDOWN)
            elif kept[job_id]:
                running.job = replace(running.job, cancel_requested=True)
                _request_stop(running, CancelReason.USER)

    async def _housekeeping(self) -> None:
        """Counts for metrics, and retention, now and then."""
        while True:
            await asyncio.sleep(max(5.0, self._cluster.poll_s))
            try:
                await self._tidy()
            except _DATABASE_DOWN:
                log.exception("housekeeping failed")

    async def _tidy(self) -> None:
        async with self._db.pool.connection() as conn:
            cursor = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            self._counts = {JobState(s): n for s, n in await cursor.fetchall()}
            cutoff = self._clock() - timedelta(seconds=self._config.retention_s)
            async with conn.transaction():
                cursor = await conn.execute(
                    "DELETE FROM jobs WHERE end_ns < %s RETURNING id", (time_ns(cutoff),)
                )
                gone = [r[0] for r in await cursor.fetchall()]
                await conn.execute("DELETE FROM job_events WHERE job_id = ANY(%s)", (gone,))


def _request_stop(running: _Running, reason: CancelReason) -> None:
    ctx, task = running.context, running.task
    if task is None or task.done() or ctx.cancel_reason is not None:
        return
    ctx.cancel_reason = reason
    task.cancel()


def _same_request(earlier: Job, spec: JobSpec) -> Job:
    if earlier.spec != spec:
        raise AlreadyExists(
            f"request_id {spec.request_id!r} was already used for a different request",
            reason="REQUEST_ID_REUSED",
        )
    return earlier


async def _one(conn: _Conn, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    cursor = await conn.execute(sql, args)
    row = await cursor.fetchone()
    return tuple(row) if row is not None else None
