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
The run of a job (workers, timeout, outcome, progress, stop) is the shared
:class:`server.runner.JobRunner`'s; this module is its sink over rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .errors import DatabaseUnavailable, InvalidArgument, NotFound, ShuttingDown
from .jobs import (
    CancelReason,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    cancel_reply,
    new_job,
    same_request,
)
from .jobstore import decode_job, encode_job, event_from_row, time_ns
from .pgstore import PgDatabase
from .queue import (
    QueueConfig,
    check_pending,
    decode_page_token,
    encode_page_token,
    too_many_jobs,
)
from .runner import JobHandler, JobRunner, OwnedTasks, cancel_and_wait
from .watch import ProgressPace, Subscription, check_watcher_limits

__all__ = ["ClusterConfig", "PgJobQueue"]

log = logging.getLogger(__name__)

_CHANNEL = "scanjobs"
# Notification payloads: new work for any worker; a new event of a job; a cancel of a job.
_NEW_WORK = "work"
_NEW_EVENT = "event:"
_CANCEL = "cancel:"
# Serialises submits, so that the job limits and request ids hold across replicas.
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
_CLAIMABLE = (
    "SELECT snapshot FROM jobs WHERE (state = 'PENDING'"
    " OR (state = 'RUNNING' AND (lease_until IS NULL OR lease_until < now())))"
    " AND id <> ALL(%s) ORDER BY number FOR UPDATE SKIP LOCKED LIMIT 1"
)
_DROP_OLDEST_ENDED = (
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE end_ns IS NOT NULL"
    " ORDER BY number LIMIT %s) RETURNING id"
)


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
        self._db = db
        self._config = config = config or QueueConfig()
        self._cluster = cluster or ClusterConfig()
        self._clock = clock
        self._listeners = tuple(listeners)
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        # Reads of a job's events in flight, shared by the watchers that wake for the same
        # notification; keyed by what is read, and by the notifications seen when it began.
        self._reads: dict[tuple[str, int, bool, int], asyncio.Future[list[JobEvent]]] = {}
        self._notified = 0  # event notifications received
        self._work = asyncio.Event()
        self._subscriptions: set[Subscription] = set()
        self._pace = ProgressPace(config.progress_budget_per_s, config.progress_interval_s)
        self._tasks = OwnedTasks()
        self._listener: _Conn | None = None
        self._counts: dict[JobState, int] = {}
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
        """Listen for notifications, start the workers, the lease keeper and the pruner.

        If any of it fails, what was started is stopped again before the error propagates.
        """
        try:
            self._listener = await psycopg.AsyncConnection.connect(self._db.url, autocommit=True)
            await self._listener.execute(f"LISTEN {_CHANNEL}")
            self._tasks.spawn(self._listen(self._listener), "pg-listen")
            self._runner.start()
            self._tasks.spawn(self._keep_leases(), "pg-leases")
            await self._tidy()
            self._tasks.spawn(self._housekeeping(), "pg-housekeeping")
        except BaseException:
            await self.close(grace_s=0.0)
            raise

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop claiming, stop local jobs at a safe point and hand them back at once (their
        leases are released, so another replica resumes them), end watchers. Returns when
        every task and connection of the queue is closed. Idempotent."""
        if self._closing:
            return
        self._closing = True
        await self._runner.close(grace_s)
        with contextlib.suppress(*_DATABASE_DOWN):
            async with self._db.pool.connection() as conn:
                await conn.execute(
                    "UPDATE jobs SET owner = NULL, lease_until = now()"
                    " WHERE owner = %s AND state = 'RUNNING'",
                    (self._cluster.replica,),
                )
                await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, _NEW_WORK))
        for subscription in list(self._subscriptions):
            subscription.fail(ShuttingDown("the server is shutting down; resume the watch"))
        await cancel_and_wait(self._tasks)  # each of them only waits: nothing to finish
        if self._listener is not None:
            await self._listener.close()

    @property
    def running_tasks(self) -> int:
        """Tasks the queue still owns (0 after :meth:`close`)."""
        return self._runner.running_tasks + len(self._tasks)

    def watcher_count(self, job_id: str | None = None) -> int:
        """Open subscriptions on this replica (of one job, or of all)."""
        if job_id is None:
            return len(self._subscriptions)
        return len(self._wakeups.get(job_id, ()))

    def stats(self) -> tuple[dict[JobState, int], int, int]:
        """Jobs by state (as of the last housekeeping), pending jobs, open watch streams."""
        return dict(self._counts), self._counts.get(JobState.PENDING, 0), len(self._subscriptions)

    # -- the JobQueue protocol -------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        """Accept a job on any replica; the job limits and request ids hold cluster-wide.

        Raises:
            ShuttingDown, AlreadyExists, ResourceExhausted: as for the embedded queue.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        async with self._db.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SUBMIT_LOCK,))
            if spec.request_id:
                sql = "SELECT snapshot FROM jobs WHERE request_id = %s"
                earlier = await _one(conn, sql, (spec.request_id,))
                if earlier is not None:
                    return same_request(decode_job(earlier[0]), spec)
            await self._admit(conn)
            job = new_job(spec, self._clock(), self._config.job_timeout_s)
            await conn.execute(
                "INSERT INTO jobs (id, state, request_id, snapshot, seq)"
                " VALUES (%s, %s, %s, %s, 0)",
                (job.id, job.state.value, spec.request_id, encode_job(job)),
            )
            event = await self._append(conn, job, state_change=True)
            await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, _NEW_WORK))
        self._announce(event)
        return job

    async def _admit(self, conn: _Conn) -> None:
        """Check the pending limit; drop the oldest ended jobs beyond ``max_jobs``."""
        sql = "SELECT count(*), count(*) FILTER (WHERE state = 'PENDING') FROM jobs"
        kept, pending = await _one(conn, sql, ()) or (0, 0)
        check_pending(pending, self._config)
        excess = kept + 1 - self._config.max_jobs
        if excess <= 0:
            return
        cursor = await conn.execute(_DROP_OLDEST_ENDED, (excess,))
        gone = [r[0] for r in await cursor.fetchall()]
        if len(gone) < excess:
            raise too_many_jobs(self._config)
        await conn.execute("DELETE FROM job_events WHERE job_id = ANY(%s)", (gone,))

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
        """Jobs newest first (submission order across replicas), through an index."""
        bound = decode_page_token(page_token, state) if page_token else 2**62
        name = state.value if state else None
        async with self._db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT number, snapshot FROM jobs WHERE number < %s AND (%s::text IS NULL"
                " OR state = %s) ORDER BY number DESC LIMIT %s",
                (bound, name, name, page_size + 1),
            )
            rows = await cursor.fetchall()
        jobs = [decode_job(r[1]) for r in rows[:page_size]]
        more = len(rows) > page_size
        return jobs, encode_page_token(rows[page_size - 1][0], state) if more else ""

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job from any replica: a committed row update, then a notification.

        Raises:
            NotFound, FailedPrecondition: as for the embedded queue.
        """
        async with self._db.pool.connection() as conn, conn.transaction():
            sql = "SELECT snapshot FROM jobs WHERE id = %s FOR UPDATE"
            row = await _one(conn, sql, (job_id,))
            if row is None:
                raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
            job = decode_job(row[0])
            answer = cancel_reply(job, self._clock(), idle=False)
            if answer is job:
                return job
            sql = "UPDATE jobs SET cancel_requested = true WHERE id = %s"
            await conn.execute(sql, (job_id,))
            event = await self._append(conn, answer, state_change=True)
            await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, _CANCEL + job_id))
        self._announce(event)
        return answer

    async def watch(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Follow a job from any replica: the table is read, notifications only wake us.

        Raises:
            NotFound, InvalidArgument, ResourceExhausted, ShuttingDown: as for the embedded
            queue.
            DatabaseUnavailable: the database cannot be reached.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down; resume the watch")
        async with self._db.pool.connection() as conn:
            row = await _one(conn, "SELECT seq FROM jobs WHERE id = %s", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        if after_sequence > row[0]:
            raise InvalidArgument(
                f"after_sequence {after_sequence} is beyond the job's latest event {row[0]}",
                field="after_sequence",
            )
        check_watcher_limits(
            of_job=self.watcher_count(job_id),
            total=len(self._subscriptions),
            max_watchers_per_job=self._config.max_watchers_per_job,
            max_watchers=self._config.max_watchers,
        )
        await self._runner.flush(job_id)  # a current snapshot
        # The state at the call, read before returning: a job that starts meanwhile must
        # not hide the state it had when the watcher came.
        latest = await self._events(job_id, 0, latest_only=True) if after_sequence == 0 else None
        wake = asyncio.Event()
        subscription = Subscription(lambda s: self._unwatch(job_id, s, wake, feeding), self._pace)
        if latest is not None:
            subscription.seed(latest)
        self._subscriptions.add(subscription)
        self._wakeups.setdefault(job_id, set()).add(wake)
        feeding = self._tasks.spawn(
            self._feed(job_id, after_sequence, latest, subscription, wake), "watch"
        )
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
        self,
        job_id: str,
        after: int,
        latest: list[JobEvent] | None,
        subscription: Subscription,
        wake: asyncio.Event,
    ) -> None:
        """Copy a job's events from the table into ``subscription`` until the terminal one
        (after ``latest``, the snapshot it was seeded with, if any)."""
        try:
            last = after
            if latest is not None:
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
            log.exception("watch of job %s failed", job_id)
            subscription.fail(
                DatabaseUnavailable("the database cannot be reached; resume the watch shortly")
            )

    async def _events(
        self, job_id: str, after: int, *, latest_only: bool = False
    ) -> list[JobEvent]:
        """Events after ``after`` in order, or only the latest one.

        Watchers of a job wake together: one read serves all that ask for the same events
        after the same notifications, so that the database's work grows with events, not
        with watchers. A read that began before a notification its caller was woken by is
        not shared with it."""
        key = (job_id, after, latest_only, self._notified)
        reading = self._reads.get(key)
        if reading is None:
            reading = self._reads[key] = self._tasks.spawn(
                self._read_events(job_id, after, latest_only=latest_only), "events"
            )
            reading.add_done_callback(lambda _: self._reads.pop(key, None))
        return await asyncio.shield(reading)

    async def _read_events(self, job_id: str, after: int, *, latest_only: bool) -> list[JobEvent]:
        async with self._db.pool.connection() as conn:
            if latest_only:
                cursor = await conn.execute(_LATEST_EVENT, (job_id,))
            else:
                cursor = await conn.execute(_EVENTS_AFTER, (job_id, after))
            rows = await cursor.fetchall()
        return [event_from_row(tuple(r)) for r in rows]

    async def _listen(self, conn: _Conn) -> None:
        """Dispatch notifications; when the database was lost, listen again once it is back
        and wake everyone, for what was notified meanwhile (polling every ``poll_s`` carries
        on in between)."""
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                async for note in conn.notifies():
                    self._dispatch(note.payload)
            await conn.close()
            conn = self._listener = await self._listen_again()
            self._work.set()
            self._notified += 1  # what was notified meanwhile: no read before it is shared
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
            except BaseException:  # cancelled by close(): the connection is not ours to leak
                await conn.close()
                raise
            return conn

    def _dispatch(self, payload: str) -> None:
        """One notification: new work, an event to wake watchers, a cancel for the owner."""
        if payload == _NEW_WORK:
            self._work.set()
        elif payload.startswith(_NEW_EVENT):
            self._notified += 1
            for wake in self._wakeups.get(payload.removeprefix(_NEW_EVENT), ()):
                wake.set()
        elif payload.startswith(_CANCEL):
            self._runner.request_stop(payload.removeprefix(_CANCEL), CancelReason.USER)

    # -- writing events ----------------------------------------------------------------------

    async def _append(
        self, conn: _Conn, job: Job, *, state_change: bool, owner: str | None = None
    ) -> JobEvent | None:
        """Write ``job`` and its event in the caller's transaction; None if ``owner`` no
        longer holds the job (its lease was taken over). An ended job's progress events go.

        The ``cancel_requested`` column is written only by CancelJob, so an owner's write
        that crossed a cancel keeps the flag: the event's job carries it. Listeners are not
        told here: the caller announces the event once its transaction committed."""
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
        if job.terminal:
            await conn.execute(
                "DELETE FROM job_events WHERE job_id = %s AND NOT state_change", (job.id,)
            )
        await conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, _NEW_EVENT + job.id))
        return event

    def _announce(self, event: JobEvent | None) -> None:
        """Tell the listeners of a committed event."""
        if event is not None:
            for listener in self._listeners:
                listener(event)

    # -- the runner's sink -------------------------------------------------------------------

    async def claim(self, start: Callable[[Job], Job]) -> Job | None:
        """Take the oldest pending job, or one whose owner's lease lapsed, and apply
        ``start`` to it; when there is none, wait for work (or ``poll_s``) and return None."""
        try:
            claimed = await self._claim(start)
        except _DATABASE_DOWN:
            log.exception("claiming a job failed")
            claimed = None
        if claimed is None:
            self._work.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cluster.poll_s):
                    await self._work.wait()
        return claimed

    async def _claim(self, start: Callable[[Job], Job]) -> Job | None:
        async with self._db.pool.connection() as conn, conn.transaction():
            # Never a job this replica still runs, even if its lease lapsed while the
            # event loop was stalled: the handler in flight would race its successor.
            row = await _one(conn, _CLAIMABLE, (self._runner.running_ids(),))
            if row is None:
                return None
            job = start(decode_job(row[0]))
            await conn.execute(
                "UPDATE jobs SET owner = %s, lease_until = now() + %s WHERE id = %s",
                (self._cluster.replica, timedelta(seconds=self._cluster.lease_s), job.id),
            )
            event = await self._append(conn, job, state_change=True)
        self._announce(event)
        return event.job if event is not None else None

    async def publish(self, job: Job, *, state_change: bool) -> Job | None:
        """Commit a change of a job this replica owns; None if another replica took it."""
        async with self._db.pool.connection() as conn, conn.transaction():
            owner = self._cluster.replica
            event = await self._append(conn, job, state_change=state_change, owner=owner)
        self._announce(event)
        return event.job if event is not None else None

    # -- leases and housekeeping -------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew the leases of local jobs; learn of cancels whose notification was lost."""
        interval = min(self._cluster.lease_s / 3, self._cluster.poll_s)
        while True:
            await asyncio.sleep(interval)
            if not self._runner.running_ids():
                continue
            try:
                await self._renew()
            except _DATABASE_DOWN:
                log.exception("renewing leases failed")

    async def _renew(self) -> None:
        ids = self._runner.running_ids()
        async with self._db.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET lease_until = now() + %s WHERE id = ANY(%s) AND owner = %s"
                " RETURNING id, cancel_requested",
                (timedelta(seconds=self._cluster.lease_s), ids, self._cluster.replica),
            )
            rows = await cursor.fetchall()
        kept: dict[str, bool] = {r[0]: r[1] for r in rows}
        for job_id in ids:
            if job_id not in kept:
                self._runner.request_stop(job_id, CancelReason.SHUTDOWN)  # lost: hand it over
            elif kept[job_id]:
                self._runner.request_stop(job_id, CancelReason.USER)

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


async def _one(conn: _Conn, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    cursor = await conn.execute(sql, args)
    row = await cursor.fetchone()
    return tuple(row) if row is not None else None
