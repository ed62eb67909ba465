"""The progress budget: what many watchers cost is messages per second, not watchers.

Every watcher of a server is sent progress at most once per ``max(progress_interval_s,
watchers / progress_budget_per_s)``: the total stays within the budget however many watch,
one watcher alone is sent every progress the job publishes, and state changes (the terminal
event too) are never held back. The queue tests run over every queue implementation (see
``tests/queues.py``); the pace itself is checked on a bare :class:`Subscription`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from scanjobs.server.jobs import (
    Job,
    JobEvent,
    JobSpec,
    JobState,
    Phase,
    Progress,
    ScanResult,
)
from scanjobs.server.runner import JobContext
from scanjobs.server.watch import ProgressPace, Subscription
from tests.conftest import eventually
from tests.queues import QueueFactory, collect

# -- the pace of one subscription -------------------------------------------------------------

_JOB = Job(
    id="job",
    spec=JobSpec("/media"),
    state=JobState.RUNNING,
    create_time=datetime(2026, 1, 1, tzinfo=UTC),
    timeout_s=60.0,
)


def _progress(sequence: int) -> JobEvent:
    job = replace(_JOB, progress=Progress(Phase.PROBING, 100, sequence))
    return JobEvent(sequence, job, state_change=False)


def _state(sequence: int, state: JobState = JobState.RUNNING) -> JobEvent:
    job = replace(_JOB, state=state, progress=Progress(Phase.PROBING, 100, sequence))
    return JobEvent(sequence, job, state_change=True)


def _subscribe(pace: ProgressPace) -> Subscription:
    subscription = Subscription(lambda _: None, pace)
    subscription.seed([_state(1)])
    return subscription


async def test_a_lone_watcher_is_sent_every_progress_at_once() -> None:
    pace = ProgressPace(budget_per_s=1000.0, min_interval_s=0.1)
    async with _subscribe(pace) as watcher:
        assert (await anext(watcher)).sequence == 1
        for sequence in range(2, 50):
            watcher.push(_progress(sequence))  # back to back, far faster than the interval
            assert (await anext(watcher)).sequence == sequence
        assert not pace.paced
        assert pace.interval_s == 0.1


async def test_a_paced_watcher_holds_progress_and_a_state_change_carries_it_at_once() -> None:
    pace = ProgressPace(budget_per_s=0.01, min_interval_s=0.0)  # one watcher: a turn per 100 s
    async with _subscribe(pace) as watcher:
        assert (await anext(watcher)).sequence == 1
        assert pace.paced  # its first turn is a phase of the interval away: > 1 s
        watcher.push(_progress(2))
        watcher.push(_progress(3))  # replaces the held one
        watcher.push(_state(4, JobState.COMPLETED))

        rest = [event async for event in watcher]

    assert [e.sequence for e in rest] == [4]  # held progress never delays a state change
    assert rest[0].job.progress.files_done == 4


async def test_held_progress_goes_out_after_the_turn_when_nothing_newer_comes() -> None:
    pace = ProgressPace(budget_per_s=20.0, min_interval_s=0.01)
    watchers = [_subscribe(pace) for _ in range(4)]  # paced: a turn per 0.2 s each
    try:
        for watcher in watchers:
            assert (await anext(watcher)).sequence == 1
            watcher.push(_progress(2))
        assert pace.paced
        # The job then says nothing more: each watcher still gets the progress it holds.
        got = await asyncio.gather(*(anext(w) for w in watchers))
        assert [e.sequence for e in got] == [2, 2, 2, 2]
    finally:
        for watcher in watchers:
            watcher.close()
    assert pace.watchers == 0


def test_watchers_take_turns_spread_over_the_interval() -> None:
    pace = ProgressPace(budget_per_s=100.0, min_interval_s=0.0)
    phases = sorted(pace.join() for _ in range(100))
    gaps = [b - a for a, b in itertools.pairwise(phases)]
    assert max(gaps) < 0.05  # no bunching: a hundred watchers fill the interval evenly
    assert pace.interval_s == 1.0


# -- the budget over a queue ------------------------------------------------------------------


class SteadyJob:
    """Reports progress every millisecond from ``go`` until it is cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.reported = 0

    async def __call__(self, job: Job, ctx: JobContext) -> ScanResult:
        self.started.set()
        await self.go.wait()
        while True:
            self.reported += 1
            ctx.report(Progress(Phase.PROBING, 0, self.reported), ScanResult(added=self.reported))
            await asyncio.sleep(0.001)  # the job's own pace, not a synchronisation


class Published:
    """A queue listener: the events of a job that were committed (progress and state changes
    apart), and a signal once there are ``enough`` progress events."""

    def __init__(self, enough: int) -> None:
        self.sequences: list[int] = []
        self.changes: list[int] = []
        self.enough = asyncio.Event()
        self._enough = enough

    def __call__(self, event: JobEvent) -> None:
        if event.state_change:
            self.changes.append(event.sequence)
        else:
            self.sequences.append(event.sequence)
            if len(self.sequences) >= self._enough:
                self.enough.set()


async def _watch_until_cancelled(
    queue: Any, job_id: str, watchers: int, published: Published
) -> tuple[list[list[JobEvent]], float]:
    """Open ``watchers`` watches of a running job, cancel it once ``published`` has had
    enough, and return what each watcher was sent and the seconds it all took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    subscriptions = [await queue.watch(job_id) for _ in range(watchers)]
    readers = [asyncio.create_task(collect(s)) for s in subscriptions]
    await published.enough.wait()
    await queue.cancel(job_id)
    streams = await asyncio.gather(*readers)
    seconds = loop.time() - started
    # A queue tells its listeners once the commit is done; PostgreSQL's watchers, woken by
    # the commit's notification, may have read the terminal event from the table first.
    terminal = streams[0][-1].sequence
    await eventually(lambda: terminal in published.changes, "the listener saw the end")
    return streams, seconds


async def test_many_watchers_share_the_budget_and_each_is_sent_every_state_change(
    make_queue: QueueFactory,
) -> None:
    watchers, budget_per_s = 10, 40.0  # each watcher: progress at most every 0.25 s
    job, published = SteadyJob(), Published(enough=30)
    queue = await make_queue(
        job, listeners=[published], progress_interval_s=0.02, progress_budget_per_s=budget_per_s
    )
    submitted = await queue.submit(JobSpec("/steady"))
    await job.started.wait()
    job.go.set()

    streams, seconds = await _watch_until_cancelled(queue, submitted.id, watchers, published)

    sent = sum(1 for events in streams for e in events[1:] if not e.state_change)
    assert sent <= budget_per_s * seconds + watchers  # one per turn, a turn per interval
    assert sent < len(published.sequences) * watchers / 2  # unpaced, each would get them all
    for events in streams:
        assert [e.sequence for e in events] == sorted({e.sequence for e in events})
        changes = [e.sequence for e in events if e.state_change and e is not events[0]]
        assert changes == [n for n in published.changes if n > events[0].sequence]
        assert events[-1].job.state is JobState.CANCELLED
        # The terminal event carries the latest progress, held or not.
        assert events[-1].job.progress.files_done == job.reported
    assert queue.watcher_count() == 0


# The in-process queue over each of its stores. Its watchers are pushed each event as it is
# committed, so what a watcher is sent is exactly what the pace lets through; watchers of the
# replicated queue read the events table, and a read that finds several events at once rightly
# coalesces their progress, pace or not.
@pytest.mark.parametrize("make_queue", ["memory", "sqlite"], indirect=True)
async def test_a_lone_watcher_is_sent_every_progress_the_job_publishes(
    make_queue: QueueFactory,
) -> None:
    job, published = SteadyJob(), Published(enough=20)
    queue = await make_queue(
        job, listeners=[published], progress_interval_s=0.05, progress_budget_per_s=40.0
    )  # two watchers would still each be sent every progress
    submitted = await queue.submit(JobSpec("/steady"))
    await job.started.wait()
    reader = asyncio.create_task(collect(await queue.watch(submitted.id)))
    job.go.set()
    await published.enough.wait()
    await queue.cancel(submitted.id)
    events = await reader

    sent = [e.sequence for e in events[1:] if not e.state_change]
    # Up to the cancel; after it a state change may carry progress that came with it.
    assert sent[:20] == published.sequences[:20]


@pytest.mark.parametrize("make_queue", ["postgres"], indirect=True)
async def test_a_hundred_watchers_over_postgresql_share_each_read_of_the_events(
    make_queue: QueueFactory,
) -> None:
    watchers = 100  # far more than the connection pool holds
    job, published = SteadyJob(), Published(enough=30)
    queue = await make_queue(job, listeners=[published], progress_interval_s=0.02)
    submitted = await queue.submit(JobSpec("/steady"))
    await job.started.wait()
    job.go.set()
    pool = make_queue._db.pool.pool
    before = pool.get_stats().get("requests_num", 0)

    streams, _ = await _watch_until_cancelled(queue, submitted.id, watchers, published)

    for events in streams:
        assert events[-1].job.state is JobState.CANCELLED
    # Each watch costs a few reads of its own; each event one read for all the watchers
    # that wake for it, never one per watcher.
    reads = pool.get_stats().get("requests_num", 0) - before
    events = len(published.sequences) + len(published.changes)
    assert reads < 4 * watchers + 10 * events, (reads, events)  # unshared: 100 per event
