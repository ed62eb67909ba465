"""The queue contract's fixture and scripted handler, shared by the queue test modules.

``make_queue`` runs a test over every queue implementation: the in-process queue over the
in-memory and the SQLite job store, and the replicated queue over PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scanjobs.server.errors import NotFound
from scanjobs.server.jobs import Job, JobEvent, JobState, Phase, Progress, ScanResult
from scanjobs.server.pgqueue import ClusterConfig, PgJobQueue
from scanjobs.server.pgstore import PgDatabase
from scanjobs.server.queue import AsyncioJobQueue, InMemoryJobStore, QueueConfig
from scanjobs.server.runner import JobContext
from scanjobs.server.store import Database
from scanjobs.server.store_jobs import SqliteJobStore
from scanjobs.server.watch import Subscription

__all__ = ["PARTIAL", "QueueFactory", "ScriptedHandler", "collect", "make_queue", "until_state"]

PARTIAL = ScanResult(added=1)


class ScriptedHandler:
    """A job handler whose behaviour the test picks through the job's path."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.release = asyncio.Event()
        self.resume_chatty = asyncio.Event()
        self.ran: list[str] = []
        self.cancelled: list[str] = []

    def started_event(self, job_id: str) -> asyncio.Event:
        return self.started.setdefault(job_id, asyncio.Event())

    async def __call__(self, job: Job, ctx: JobContext) -> ScanResult:
        self.ran.append(job.id)
        self.started_event(job.id).set()
        try:
            return await self._behave(job, ctx)
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            raise

    async def _behave(self, job: Job, ctx: JobContext) -> ScanResult:
        path = job.spec.path
        if path == "/fail":
            raise RuntimeError("boom")
        if path == "/refuse":
            raise NotFound("/refuse vanished")
        if path in {"/chatty", "/chatty-then-block"}:
            for n in range(1, 2001):
                ctx.report(Progress(Phase.PROBING, 2000, n), ScanResult(added=n))
                if n % 100 == 0:
                    await asyncio.sleep(0)
            if path == "/chatty-then-block":
                await self.resume_chatty.wait()
            return ScanResult(added=2000)
        if path == "/stubborn":  # ignores its first cancel; the second one ends it
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
            await asyncio.Event().wait()
        if path == "/report-then-end":  # progress due in the very step the job ends
            ctx.report(Progress(Phase.PROBING, 1, 1, "/report-then-end/one"), PARTIAL)
            return ScanResult(added=1)
        if path == "/block":
            ctx.report(Progress(Phase.PROBING, 2, 1, "/block/one"), PARTIAL)
            await self.release.wait()
            return ScanResult(added=2)
        return ScanResult(added=3)


class QueueFactory:
    """Makes queues of one implementation sharing one backing, so that a second queue is the
    server after a restart: ``await make_queue(handler, workers=1, listeners=[...])``."""

    def __init__(self, kind: str, db: Any, postgres_url: str, sqlite_path: Path) -> None:
        self.kind = kind
        self.queues: list[Any] = []
        self._db = db
        self._memory = InMemoryJobStore()
        self._postgres_url = postgres_url
        self._sqlite_path = sqlite_path

    async def __call__(
        self,
        handler: ScriptedHandler,
        *,
        listeners: Sequence[Callable[[JobEvent], None]] = (),
        **config: float,
    ) -> Any:
        settings = QueueConfig(**config)  # type: ignore[arg-type]
        queue: Any
        if self.kind == "postgres":
            cluster = ClusterConfig(lease_s=5.0, poll_s=0.2)
            queue = PgJobQueue(handler, self._db, settings, cluster, listeners=listeners)
        else:
            store = self._memory if self._db is None else SqliteJobStore(self._db)
            queue = AsyncioJobQueue(handler, settings, store=store, listeners=listeners)
        await queue.start()
        self.queues.append(queue)
        return queue

    def committed_sequence(self, job_id: str) -> int:
        """The latest event of a job that its store has committed, read without the event
        loop (so that it can be called from a listener)."""
        if self.kind == "memory":
            return max((e.sequence for e in self._memory._events.get(job_id, [])), default=0)
        sql = "SELECT max(sequence) FROM job_events WHERE job_id = "
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self._sqlite_path)) as conn:
                row = conn.execute(sql + "?", (job_id,)).fetchone()
        else:
            with psycopg.connect(self._postgres_url, autocommit=True) as pg:
                row = pg.execute(sql + "%s", (job_id,)).fetchone()  # type: ignore[arg-type]
        return (row[0] if row else None) or 0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    """Queues over every implementation: the in-process queue over the in-memory and the
    SQLite job store, and the replicated queue over PostgreSQL."""
    db: Any = None
    url = ""
    if request.param == "sqlite":
        db = await Database.open(tmp_path / "jobs.db")
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        db = await PgDatabase.open(url)
    factory = QueueFactory(request.param, db, url, tmp_path / "jobs.db")
    yield factory
    for queue in factory.queues:
        await queue.close(grace_s=1.0)
        assert queue.running_tasks == 0
    if db is not None:
        await db.close()


async def collect(subscription: Subscription) -> list[JobEvent]:
    async with subscription:
        return [e async for e in subscription]


async def until_state(queue: AsyncioJobQueue, job_id: str, state: JobState) -> Job:
    async with await queue.watch(job_id) as events:
        async for event in events:
            if event.job.state is state:
                return event.job
    raise AssertionError(f"job never reached {state}")
